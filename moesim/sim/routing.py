"""Routing of one (step, layer) onto devices: loads and traffic.

Replica choice (:mod:`moesim.placement.choice`) and per-slot capacity
(:mod:`moesim.placement.capacity`) are the placement's routing core; this module adds what
the simulator needs on top: per-device and per-slot loads before and after capacity, and
the (D, D) dispatch and wire-copy matrices under a de-duplication policy. Everything is
vectorised over assignments (token, selected expert); there is no per-token Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moesim.dispatchers import Dedup
from moesim.placement.capacity import Overflow, apply_slot_capacity
from moesim.placement.choice import ReplicaChoice, choose_replicas, copies_per_device
from moesim.sim.traffic import copy_matrix, traffic_matrix

__all__ = [
    "LayerRouting",
    "busiest_flow",
    "cross_node_total",
    "merge_routing",
    "route_layer",
    "slot_loads",
]


@dataclass(frozen=True)
class LayerRouting:
    """Result of routing one layer step onto devices.

    Attributes:
        device_load: (D,) assignments each device processes (after capacity and replicas).
        expert_tokens: (D, S) tokens per hosted expert slot of each device.
        dispatch: (D, D) assignments sent src → dst (diagonal: stays on the device);
            None once :meth:`compact` has dropped the matrices.
        copies: (D, D) token copies on the wire src → dst under the de-duplication policy
            (see :mod:`moesim.sim.traffic`); equals ``dispatch`` for ``dedup="none"``.
        dropped: (D,) dropped assignments, by the device of the token.
        rerouted: total assignments rerouted to another expert.
        assignments: total assignments before capacity.
        cross_node_copies: copies between devices of different nodes (set by ``compact``).
        busiest_flow: (src, dst, copies) of the largest off-diagonal entry of ``copies``
            (set by ``compact``).
        busiest_link: (link index, copies) of the fabric link the most copies cross (set by
            ``compact`` given a topology, for clusters small enough to route every pair).
        expert_load: (E,) assignments each logical expert was routed, before capacity.
        routed_load: (D,) assignments each device was routed (after replica choice), before
            capacity; equals ``device_load`` in a dropless run.
        dropless_capacity_factor: the smallest capacity factor that drops nothing: the
            largest routed slot load over the mean slot load (assignments / physical slots).
    """

    device_load: np.ndarray
    expert_tokens: np.ndarray
    dispatch: np.ndarray | None
    copies: np.ndarray | None
    dropped: np.ndarray
    rerouted: int
    assignments: int
    cross_node_copies: float | None = None
    busiest_flow: tuple[int, int, float] | None = None
    busiest_link: tuple[int, float] | None = None
    expert_load: np.ndarray | None = None
    routed_load: np.ndarray | None = None
    dropless_capacity_factor: float = 1.0

    def compact(self, devices_per_node: int, topology: Any = None) -> LayerRouting:
        """The same routing without its (D, D) matrices, keeping what is read of them
        later (cross-node copies, the busiest flow): a 2,048-device step then holds one
        layer's matrices at a time instead of every layer's."""
        if self.copies is None:
            return self
        return replace(
            self,
            dispatch=None,
            copies=None,
            cross_node_copies=cross_node_total(self.copies, devices_per_node),
            busiest_flow=busiest_flow(self.copies),
            busiest_link=None if topology is None else _busiest_link(self.copies, topology),
        )


def _busiest_link(m: np.ndarray, topology: Any) -> tuple[int, float] | None:
    from moesim.sim.exchange import busiest_link

    return busiest_link(m, topology)


def cross_node_total(m: np.ndarray, devices_per_node: int) -> float:
    """Sum of the (D, D) matrix over pairs of devices on different nodes."""
    from moesim.sim.network import block_diagonal_sums

    return float(m.sum(dtype=np.float64) - block_diagonal_sums(m, devices_per_node)[0].sum())


def busiest_flow(m: np.ndarray) -> tuple[int, int, float]:
    """(src, dst, value) of the largest off-diagonal entry of the (D, D) matrix ``m``."""
    d = m.shape[0]
    if d < 2:
        return 0, 0, 0.0
    flat = np.ascontiguousarray(m).reshape(-1)
    best = np.argmax(flat)  # usually off the diagonal; if not, look again without it
    src, dst = divmod(int(best), d)
    if src == dst:
        # mask the diagonal in place (restored below) rather than copy (D, D) values
        off = flat if flat.flags.writeable else flat.copy()
        diag = off[:: d + 1].copy()
        off[:: d + 1] = -np.inf if off.dtype.kind == "f" else np.iinfo(off.dtype).min
        try:
            src, dst = divmod(int(np.argmax(off)), d)
        finally:
            off[:: d + 1] = diag
    return src, dst, float(m[src, dst])


def slot_loads(
    dst: np.ndarray, expert: np.ndarray, slots: np.ndarray, copies: np.ndarray
) -> np.ndarray:
    """(D, S) assignments each physical slot serves: per (device, expert) from the
    assignments' serving devices and experts, split evenly over a device's copies of one
    expert. ``slots``: (D, S) hosted experts; ``copies``: (D, E) copies of each expert on
    each device (:func:`moesim.placement.choice.copies_per_device`)."""
    d, e = copies.shape
    key = np.multiply(dst, e, dtype=np.int64)
    key += expert
    per = np.bincount(key, minlength=d * e).reshape(d, e)
    rows = np.arange(d)[:, None]
    return per[rows, slots] / copies[rows, slots]


def route_layer(
    ids: np.ndarray,
    origin: np.ndarray,
    slots: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    *,
    num_experts: int,
    devices_per_node: int,
    capacity: int | None = None,
    overflow: Overflow = "drop",
    dedup: Dedup = "none",
    replica_choice: ReplicaChoice = "nearest",
) -> LayerRouting:
    """Route one layer step: replica choice, per-slot capacity (None: dropless), loads and
    traffic.

    Args:
        ids: (T, K) expert ids; origin: (T,) device of each token; slots: (D, S) hosted
        experts; table/count: replicas of each expert (see ``Placement.replicas``);
        capacity: assignments per physical slot (see
        :func:`moesim.placement.capacity.slot_capacity`); replica_choice: see
        :func:`moesim.placement.choice.choose_replicas`.
    """
    t, k = ids.shape
    d = slots.shape[0]
    tok = np.repeat(np.arange(t), k)
    src = np.repeat(origin, k)
    routed_exp = ids.reshape(-1)
    routed_dst = choose_replicas(
        routed_exp, src, tok, table, count, devices_per_node, replica_choice, d
    )
    if capacity is None:
        exp, dst, rerouted = routed_exp, routed_dst, 0
    else:
        fe, fd, rr = apply_slot_capacity(ids, routed_dst.reshape(t, k), table, capacity, overflow)
        exp, dst, rerouted = fe.reshape(-1), fd.reshape(-1), int(rr.sum())
    kept = exp >= 0
    all_kept = bool(kept.all())
    copies = copies_per_device(table, d)
    routed_slots = slot_loads(routed_dst, routed_exp, slots, copies)
    expert_tokens = routed_slots if all_kept else slot_loads(dst[kept], exp[kept], slots, copies)
    mean_slot = t * k / slots.size
    dispatch = traffic_matrix(src, dst, d) if all_kept else traffic_matrix(src[kept], dst[kept], d)
    device_load = dispatch.sum(axis=0)  # what each device receives is what it processes
    return LayerRouting(
        device_load=device_load,
        expert_tokens=expert_tokens,
        dispatch=dispatch,
        copies=dispatch
        if dedup == "none"
        else copy_matrix(dst.reshape(t, k), origin, d, devices_per_node, dedup),
        dropped=np.zeros(d, dtype=np.int64) if all_kept else np.bincount(src[~kept], minlength=d),
        rerouted=rerouted,
        assignments=t * k,
        expert_load=np.bincount(routed_exp, minlength=num_experts),
        # dropless, every assignment is processed where it was routed
        routed_load=device_load if capacity is None else np.bincount(routed_dst, minlength=d),
        dropless_capacity_factor=float(routed_slots.max() / mean_slot) if mean_slot else 1.0,
    )


def merge_routing(parts: list[LayerRouting]) -> LayerRouting:
    """One layer's routing of several microbatches, summed (loads, traffic, drops).

    Compacted parts (see :meth:`LayerRouting.compact`) merge into a compacted result:
    cross-node copies add up; the busiest flow and link are the busiest of any microbatch.
    """
    first = parts[0]
    if len(parts) == 1:
        return first

    def total(values: list[Any]) -> Any:
        """Sum of the parts' values, None when any part has none (compacted)."""
        return None if any(v is None for v in values) else sum(values[1:], values[0])

    flows = [p.busiest_flow for p in parts if p.busiest_flow is not None]
    links = [p.busiest_link for p in parts if p.busiest_link is not None]
    return LayerRouting(
        device_load=sum((p.device_load for p in parts[1:]), first.device_load),
        expert_tokens=sum((p.expert_tokens for p in parts[1:]), first.expert_tokens),
        dispatch=total([p.dispatch for p in parts]),
        copies=total([p.copies for p in parts]),
        dropped=sum((p.dropped for p in parts[1:]), first.dropped),
        rerouted=sum(p.rerouted for p in parts),
        assignments=sum(p.assignments for p in parts),
        cross_node_copies=total([p.cross_node_copies for p in parts]),
        busiest_flow=max(flows, key=lambda f: f[2]) if len(flows) == len(parts) else None,
        busiest_link=max(links, key=lambda f: f[1]) if len(links) == len(parts) else None,
        expert_load=total([p.expert_load for p in parts]),
        routed_load=total([p.routed_load for p in parts]),
        dropless_capacity_factor=max(p.dropless_capacity_factor for p in parts),
    )
