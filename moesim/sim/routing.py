"""Routing arithmetic for one (step, layer): capacity, replica choice, loads and traffic.

Everything here is vectorised over assignments (token, selected expert); there is no
per-token Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from moesim.sim.traffic import Dedup, copy_matrix, traffic_matrix

__all__ = [
    "REPLICA_CHOICES",
    "LayerRouting",
    "ReplicaChoice",
    "apply_capacity",
    "busiest_flow",
    "choose_replicas",
    "cross_node_total",
    "expert_capacity",
    "merge_routing",
    "route_layer",
    "traffic_matrix",
]


def expert_capacity(
    capacity_factor: float | None, tokens: int, top_k: int, num_experts: int
) -> int:
    """``ceil(capacity_factor * tokens * top_k / num_experts)``; unlimited when factor is None."""
    if capacity_factor is None:
        return tokens * top_k
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def _rank_in_group(keys: np.ndarray) -> np.ndarray:
    """Position of each element among equal keys, in array order.

    Expert ids fit 16 bits, for which NumPy's stable argsort is a radix sort (linear).
    """
    small = keys.size and int(keys.min()) >= -(2**15) and int(keys.max()) < 2**15
    k = keys.astype(np.int16) if small else keys
    order = np.argsort(k, kind="stable")
    sk = k[order]
    idx = np.arange(keys.size)
    run_start = np.ones(keys.size, dtype=bool)
    run_start[1:] = sk[1:] != sk[:-1]
    first = np.maximum.accumulate(np.where(run_start, idx, 0))
    pos = np.empty_like(order)
    pos[order] = idx - first
    return pos


def apply_capacity(
    ids: np.ndarray, num_experts: int, capacity: int, overflow: str = "drop"
) -> tuple[np.ndarray, np.ndarray]:
    """Enforce expert capacity on one layer step.

    Priority follows GShard: all first choices (rank 0) in token order, then all second
    choices, and so on. With ``overflow="reroute"`` an assignment over capacity moves to
    the least-loaded expert that still has room and that the token has not chosen
    (ties to the lower id); what finds no room is dropped.

    Args:
        ids: (T, K) expert ids.
    Returns:
        final: (T, K) expert ids after rerouting, -1 where the assignment was dropped.
        rerouted: (T, K) bool, True where the assignment moved to another expert.
    """
    t, k = ids.shape
    flat = ids.T.reshape(-1)  # (K*T,), rank-major priority order
    keep = _rank_in_group(flat) < capacity
    final = np.where(keep, flat, -1).reshape(k, t).T.copy()
    rerouted = np.zeros_like(final, dtype=bool)
    if overflow == "drop" or keep.all():
        return final, rerouted
    load = np.bincount(flat[keep], minlength=num_experts)
    pend_t, pend_k = np.nonzero((final < 0).T)  # priority order: rank, then token
    pend_t, pend_k = pend_k, pend_t
    while pend_t.size and (load < capacity).any():
        chosen = np.zeros((pend_t.size, num_experts), dtype=bool)  # (P, E)
        np.put_along_axis(chosen, np.where(final[pend_t] < 0, ids[pend_t], final[pend_t]), True, 1)
        np.put_along_axis(chosen, ids[pend_t], True, axis=1)
        room = capacity - load
        score = np.where(chosen | (room <= 0)[None, :], np.iinfo(np.int64).max, load[None, :])
        target = np.argmin(score, axis=1)
        ok = score[np.arange(pend_t.size), target] != np.iinfo(np.int64).max
        # accept, per target expert, as many as it has room for, in priority order
        accept = ok & (_rank_in_group(np.where(ok, target, -1)) < room[target])
        # one reroute per token per round: two of a token's overflows may not pick the same
        # expert; the later ones try again next round, seeing the new choice
        idx = np.flatnonzero(accept)
        _, first = np.unique(pend_t[idx], return_index=True)
        accept[:] = False
        accept[idx[first]] = True
        final[pend_t[accept], pend_k[accept]] = target[accept]
        rerouted[pend_t[accept], pend_k[accept]] = True
        load += np.bincount(target[accept], minlength=num_experts)
        if not accept.any():
            break
        pend_t, pend_k = pend_t[~accept], pend_k[~accept]
    return final, rerouted


ReplicaChoice = Literal["nearest", "round-robin", "least-loaded", "batch-split"]
REPLICA_CHOICES: tuple[str, ...] = get_args(ReplicaChoice)


def choose_replicas(
    experts: np.ndarray,
    origin: np.ndarray,
    token: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    devices_per_node: int,
    policy: ReplicaChoice = "nearest",
    num_devices: int | None = None,
) -> np.ndarray:
    """Device that serves each assignment, among the replicas of its expert.

    Policies:

    - ``nearest``: the token's own device if it hosts the expert, else the first replica on
      the token's node, else replica ``token mod replicas``.
    - ``round-robin``: the j-th assignment of an expert in the batch (in order) goes to its
      replica ``j mod replicas`` (even split, blind to locality).
    - ``least-loaded``: replicas on the token's node if it has any, else all replicas;
      within those, the split of the batch's assignments that makes the largest device
      load as small as possible (locality first, then balance).
    - ``batch-split``: any replica: the split that makes the batch's largest device load
      as small as the placement allows (exact balance per batch, blind to locality).

    Args:
        experts: (A,) expert id of each assignment; origin: (A,) token's device;
        token: (A,) token index; table: (E, R) replicas padded with -1; count: (E,).
        num_devices: D, needed by the load-aware policies (default: highest device + 1).
    Returns:
        (A,) serving device.
    """
    if table.shape[1] == 1:  # one replica per expert: nothing to choose
        return table[experts, 0].astype(np.int32)
    if policy == "round-robin":
        j = _rank_in_group(experts) % count[experts]
        return table[experts, j].astype(np.int32)
    if policy in ("least-loaded", "batch-split"):
        d = int(table.max()) + 1 if num_devices is None else num_devices
        return _water_filled(
            experts, origin, table, count, devices_per_node, d, local=policy == "least-loaded"
        )
    cand = table[experts]  # (A, R)
    valid = cand >= 0
    same_dev = valid & (cand == origin[:, None])
    same_node = valid & (cand // devices_per_node == (origin // devices_per_node)[:, None])
    fallback = cand[np.arange(experts.size), token % count[experts]]
    first_dev = cand[np.arange(experts.size), np.argmax(same_dev, axis=1)]
    first_node = cand[np.arange(experts.size), np.argmax(same_node, axis=1)]
    return np.where(
        same_dev.any(axis=1), first_dev, np.where(same_node.any(axis=1), first_node, fallback)
    ).astype(np.int32)


def _split_flow(
    sizes: np.ndarray, edges: np.ndarray, base: np.ndarray, level: int
) -> np.ndarray | None:
    """Assignments of each group to each allowed device so that no device exceeds
    ``level`` (with ``base`` already on it), as a max-flow; None when impossible.

    Args:
        sizes: (G,) assignments per group; edges: (P, 2) allowed (group, device) pairs;
        base: (D,) fixed device loads.
    Returns:
        (P,) assignments on each edge.
    """
    g, d = sizes.size, base.size
    src, sink = g + d, g + d + 1
    big = int(sizes.sum())
    rows = np.concatenate([np.full(g, src), edges[:, 0], g + np.arange(d)])
    cols = np.concatenate([np.arange(g), g + edges[:, 1], np.full(d, sink)])
    cap = np.concatenate([sizes, np.full(len(edges), big), np.maximum(level - base, 0)])
    graph = csr_matrix((cap.astype(np.int32), (rows, cols)), shape=(g + d + 2, g + d + 2))
    res = maximum_flow(graph, src, sink)
    if res.flow_value < big:
        return None
    flow = res.flow.tocsr()
    return np.asarray(flow[edges[:, 0], g + edges[:, 1]]).ravel().astype(np.int64)


def _water_filled(
    experts: np.ndarray,
    origin: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    devices_per_node: int,
    num_devices: int,
    *,
    local: bool,
) -> np.ndarray:
    """Replica choice of the ``least-loaded`` (local=True) and ``batch-split`` policies.

    Assignments of replicated experts are grouped by expert (and, when local, by the
    token's node if it hosts a replica, else one group of the rest); each group may use its
    allowed replicas. The split minimising the largest device load (on top of the loads of
    single-replica experts) is found exactly: a binary search on that load, each step a
    max-flow from groups to devices. Each group's assignments (in order) then take their
    devices' shares in turn.
    """
    dst = np.full(experts.size, -1, dtype=np.int32)
    single = count[experts] == 1
    dst[single] = table[experts[single], 0]
    base = np.bincount(dst[single], minlength=num_devices).astype(np.int64)
    multi = np.flatnonzero(~single)
    if not multi.size:
        return dst
    e_m = experts[multi]
    nodes = (num_devices + devices_per_node - 1) // devices_per_node
    if local:
        rep_node = np.where(table >= 0, table // devices_per_node, -1)  # (E, R)
        tok_node = origin[multi] // devices_per_node
        has_local = (rep_node[e_m] == tok_node[:, None]).any(axis=1)
        sub = np.where(has_local, tok_node, nodes)  # `nodes`: no replica on the token's node
    else:
        sub = np.zeros(e_m.size, dtype=np.int64)
    key = e_m.astype(np.int64) * (nodes + 1) + sub
    uniq, inv, sizes = np.unique(key, return_inverse=True, return_counts=True)
    ge, gn = uniq // (nodes + 1), uniq % (nodes + 1)
    reps = table[ge]  # (G, R)
    allowed = reps >= 0
    if local:
        allowed &= (gn == nodes)[:, None] | (reps // devices_per_node == gn[:, None])
    gi, ri = np.nonzero(allowed)
    # one edge per (group, device), even where a device hosts the expert twice
    edges = np.unique(np.stack([gi, reps[gi, ri]], axis=1), axis=0)  # sorted by group
    gi = edges[:, 0]
    total = int(sizes.sum()) + int(base.sum())
    lo = max(int(base.max()), -(-total // num_devices))  # no split does better
    # even split over allowed replicas: a feasible upper bound
    nallow = np.bincount(gi, minlength=uniq.size)
    even = base + np.bincount(
        edges[:, 1], weights=np.ceil(sizes / nallow)[gi], minlength=num_devices
    )
    hi = int(even.max())
    best = _split_flow(sizes, edges, base, hi)
    while lo < hi:
        mid = (lo + hi) // 2
        flow = _split_flow(sizes, edges, base, mid)
        if flow is None:
            lo = mid + 1
        else:
            hi, best = mid, flow
    assert best is not None
    # per group: cumulative shares over its edges (edges are grouped, in group order)
    cum = np.cumsum(best)
    first = np.searchsorted(gi, np.arange(uniq.size))  # first edge of each group
    start = cum[first] - best[first]  # flow before the group's first edge
    rank = _rank_in_group(inv)
    pos = start[inv] + rank  # position in the concatenated edge shares
    edge = np.searchsorted(cum, pos, side="right")
    dst[multi] = edges[edge, 1]
    return dst


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


def route_layer(
    ids: np.ndarray,
    origin: np.ndarray,
    slots: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    *,
    num_experts: int,
    devices_per_node: int,
    capacity: int,
    overflow: str = "drop",
    dedup: Dedup = "none",
    replica_choice: ReplicaChoice = "nearest",
) -> LayerRouting:
    """Route one layer step: capacity, replica choice, per-device and per-slot loads, traffic.

    Args:
        ids: (T, K) expert ids; origin: (T,) device of each token; slots: (D, S) hosted
        experts; table/count: replicas of each expert (see ``Placement.replicas``);
        replica_choice: see :func:`choose_replicas`.
    """
    t, k = ids.shape
    d = slots.shape[0]
    final, rerouted = apply_capacity(ids, num_experts, capacity, overflow)
    tok = np.repeat(np.arange(t), k)
    exp = final.reshape(-1)
    src = origin[tok]
    kept = exp >= 0
    dst = choose_replicas(
        exp[kept], src[kept], tok[kept], table, count, devices_per_node, replica_choice, d
    )
    device_load = np.bincount(dst, minlength=d)
    dropped = np.bincount(src[~kept], minlength=d)
    # tokens per (device, expert) then read out per slot; a device hosting an expert
    # twice splits its tokens evenly over the two slots
    per_dev_exp = np.bincount(
        dst.astype(np.int64) * num_experts + exp[kept], minlength=d * num_experts
    )
    per_dev_exp = per_dev_exp.reshape(d, num_experts)
    dup = np.zeros((d, num_experts), dtype=np.int64)
    np.add.at(dup, (np.repeat(np.arange(d), slots.shape[1]), slots.reshape(-1)), 1)
    expert_tokens = per_dev_exp[np.arange(d)[:, None], slots] / dup[np.arange(d)[:, None], slots]
    dispatch = traffic_matrix(src[kept], dst, d)
    expert_load = np.bincount(ids.reshape(-1), minlength=num_experts)
    if kept.all():
        routed_dst, routed_exp = dst, exp
    else:  # where the assignments would have gone without a capacity limit
        routed_exp = ids.reshape(-1)
        routed_dst = choose_replicas(
            routed_exp, src, tok, table, count, devices_per_node, replica_choice, d
        )
    routed_dev_exp = np.bincount(
        routed_dst.astype(np.int64) * num_experts + routed_exp, minlength=d * num_experts
    ).reshape(d, num_experts)
    routed_slots = routed_dev_exp[np.arange(d)[:, None], slots] / dup[np.arange(d)[:, None], slots]
    mean_slot = t * k / slots.size
    return LayerRouting(
        expert_load=expert_load,
        routed_load=np.bincount(routed_dst, minlength=d),
        dropless_capacity_factor=float(routed_slots.max() / mean_slot) if mean_slot else 1.0,
        device_load=device_load,
        expert_tokens=expert_tokens,
        dispatch=dispatch,
        copies=dispatch
        if dedup == "none"
        else copy_matrix(tok[kept], src[kept], dst, d, devices_per_node, dedup),
        dropped=dropped,
        rerouted=int(rerouted.sum()),
        assignments=t * k,
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
