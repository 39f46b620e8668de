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
from moesim.sim.counts import draw_counts_layers, inclusion_probabilities, route_counts_layers
from moesim.sim.prepare import Prepared
from moesim.sim.routing import (
    LayerRouting,
    route_layer,
)
from moesim.traces.store import RoutingTrace
from moesim.traces.window import ReplayTrace

__all__ = [
    "StreamedRouting",
    "route_counts_at",
    "route_layer_at",
    "route_step",
    "step_tokens",
]


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
        return route_counts_at(prep, step, [li], microbatch, microbatches)[0]
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


def route_counts_at(
    prep: Prepared, step: int, layers: list[int], microbatch: int = 0, microbatches: int = 1
) -> list[LayerRouting]:
    """Route count-level MoE layers ``layers`` (indices among the MoE layers) of one step
    or microbatch in one vectorised pass; each layer draws with its own seed, so a layer's
    routing is the same whichever layers are routed with it."""
    sc, shape, d = prep.scenario, prep.shape, prep.cluster.num_devices
    assert prep.popularity is not None, "count level only"
    mb = sc.tokens_per_device // microbatches
    slots = [prep.placement.slots[li] for li in layers]
    cap = slot_capacity(sc.capacity.factor, d * mb * shape.top_k, slots[0].size)
    reps = [prep.placement.replicas(li) for li in layers]
    pi = np.stack(
        [inclusion_probabilities(prep.popularity(li, step), shape.top_k) for li in layers]
    )
    seed = prep.popularity.seed
    rngs = [np.random.default_rng(_seeds(seed, step, li, microbatch)) for li in layers]
    return route_counts_layers(
        draw_counts_layers(pi, mb, d, shape.top_k, rngs),
        slots,
        [t for t, _ in reps],
        [n for _, n in reps],
        devices_per_node=prep.cluster.devices_per_node,
        capacity=cap,
        replica_choice=sc.replica_choice,
    )


@lru_cache(maxsize=1024)
def _seeds(seed: int, step: int, layer: int, microbatch: int) -> np.random.SeedSequence:
    """The seed of a count-level draw (its hashing done once per process: a sweep's cases
    draw with the same seeds)."""
    return np.random.SeedSequence([seed, 0xC0417, step, layer, microbatch])


#: a count-level step or microbatch routes all its MoE layers at once when they hold at most
#: this many (sender, slot) flows in all (layers x devices x physical slots)
BATCH_MAX_FLOWS = 1 << 20


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
        # count level on a small cluster: every layer routed in one vectorised pass, on
        # the first layer asked for (its (D, D) matrices held until asked for)
        self.ahead: dict[int, LayerRouting] | None = None
        if prep.trace is None:
            s = prep.placement.slots
            d = prep.cluster.num_devices
            self.ahead = {} if len(self.index) * d * s[0].size <= BATCH_MAX_FLOWS else None

    def __getitem__(self, layer: int) -> LayerRouting:
        if layer in self.kept:
            return self.kept[layer]
        if self.ahead is not None and not self.ahead and not self.kept:
            routed = route_counts_at(
                self.prep, self.step, list(self.index.values()), self.mb, self.n_mb
            )
            self.ahead = dict(zip(self.index, routed, strict=True))
        if self.ahead:
            full = self.ahead.pop(layer)
        else:
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
