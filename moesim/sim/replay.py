"""The routing a run replays: which trace tokens each step takes, and every MoE layer of a
step (or of one of its microbatches) routed onto the placement.

Token-level routing goes through :func:`moesim.sim.routing.route_layer`, count-level
routing through :func:`moesim.sim.counts.route_counts`; both use the placement's routing
core (replica choice and per-slot capacity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache

import numpy as np

from moesim.placement.capacity import slot_capacity
from moesim.sim.counts import draw_counts, inclusion_probabilities, route_counts
from moesim.sim.prepare import Prepared
from moesim.sim.routing import (
    LayerRouting,
    route_layer,
)
from moesim.traces.store import RoutingTrace
from moesim.traces.window import ReplayTrace

__all__ = ["StreamedRouting", "route_layer_at", "route_step", "step_tokens"]


def step_tokens(trace: RoutingTrace | ReplayTrace, step: int, count: int) -> np.ndarray:
    """Indices of the ``count`` trace tokens replayed at ``step`` (the trace repeats
    cyclically): steps 0..S-1 replay the first min(N, S x count) tokens."""
    return (step * count + np.arange(count)) % trace.num_tokens


def route_step(
    prep: Prepared, step: int, microbatch: int = 0, microbatches: int = 1
) -> dict[int, LayerRouting]:
    """Route every MoE layer of one step (or of one of its microbatches: each device's
    tokens split into ``microbatches`` equal parts); keyed by model layer index."""
    return {
        layer: route_layer_at(prep, step, li, microbatch, microbatches)
        for li, layer in enumerate(prep.moe_layers)
    }


def route_layer_at(
    prep: Prepared, step: int, li: int, microbatch: int = 0, microbatches: int = 1
) -> LayerRouting:
    """Route MoE layer ``li`` (its index among the MoE layers) of one step or microbatch."""
    sc, shape, d = prep.scenario, prep.shape, prep.cluster.num_devices
    per_dev = sc.tokens_per_device
    mb = per_dev // microbatches
    cap = slot_capacity(sc.capacity.factor, d * mb * shape.top_k, prep.placement.slots[li].size)
    table, nrep = prep.placement.replicas(li)
    if prep.trace is None:  # count level (``routing.synthetic.level: count``)
        assert prep.popularity is not None
        pi = inclusion_probabilities(prep.popularity(li, step), shape.top_k)
        rng = np.random.default_rng(_seeds(prep.popularity.seed, step, li, microbatch))
        return route_counts(
            draw_counts(pi, mb, d, shape.top_k, rng),
            prep.placement.slots[li],
            table,
            nrep,
            devices_per_node=prep.cluster.devices_per_node,
            capacity=cap,
            replica_choice=sc.replica_choice,
        )
    idx = step_tokens(prep.trace, step, d * per_dev)
    pos = (np.arange(d)[:, None] * per_dev + microbatch * mb + np.arange(mb)[None, :]).ravel()
    origin = (np.arange(d * mb) // mb).astype(np.int32)
    return route_layer(
        prep.trace.layer_ids(li, idx[pos]),
        origin,
        prep.placement.slots[li],
        table,
        nrep,
        num_experts=shape.num_experts,
        devices_per_node=prep.cluster.devices_per_node,
        capacity=cap,
        overflow=sc.capacity.overflow,
        dedup=prep.dispatcher.dedup,
        replica_choice=sc.replica_choice,
    )


@lru_cache(maxsize=1024)
def _seeds(seed: int, step: int, layer: int, microbatch: int) -> np.random.SeedSequence:
    """The seed of a count-level draw (its hashing done once per process: a sweep's cases
    draw with the same seeds)."""
    return np.random.SeedSequence([seed, 0xC0417, step, layer, microbatch])


class StreamedRouting(Mapping[int, LayerRouting]):
    """One step's (or microbatch's) routing, routed layer by layer as the program builder
    asks for it. The builder gets the full routing of a layer; what stays behind is its
    compact form (no (D, D) matrices), so memory holds one layer's traffic at a time."""

    def __init__(
        self,
        prep: Prepared,
        step: int,
        microbatch: int,
        microbatches: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """``progress(1)`` is called as each layer is routed (once per layer)."""
        self.prep, self.step, self.mb, self.n_mb = prep, step, microbatch, microbatches
        self.progress = progress
        self.index = {layer: li for li, layer in enumerate(prep.moe_layers)}
        self.kept: dict[int, LayerRouting] = {}

    def __getitem__(self, layer: int) -> LayerRouting:
        if layer in self.kept:
            return self.kept[layer]
        full = route_layer_at(self.prep, self.step, self.index[layer], self.mb, self.n_mb)
        cl = self.prep.cluster
        self.kept[layer] = full.compact(cl.devices_per_node, cl.topology)
        if self.progress is not None:
            self.progress(1)
        return full

    def __iter__(self) -> Iterator[int]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, layer: object) -> bool:
        return layer in self.index
