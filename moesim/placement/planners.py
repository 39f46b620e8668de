"""Expert placement planners: pure functions from per-layer expert loads to a placement.

Every planner fills exactly ``S = (E + redundant) / D`` slots on each of the ``D`` devices
of every layer and hosts every logical expert at least once. All but the two ``eplb-*``
planners also put no expert twice on one device and give no expert more replicas than
``max_replicas`` (default: one per device). One public entry point, :func:`plan`, picks
the strategy:

=========================  =================================================================
strategy                   what it does
=========================  =================================================================
``contiguous``             experts in id order, in blocks of ``S`` (Megatron's default);
                           the redundant slots repeat experts 0, 1, ... (load-unaware)
``round-robin``            expert ``i`` to device ``i mod D``; redundant slots repeat
                           experts 0, 1, ... on the next device that does not host them yet
``greedy``                 the ``redundant`` heaviest experts get one extra replica each,
                           then longest-processing-time (LPT) packing onto devices
``eplb-global``            DeepSeek EPLB's global policy as published
                           (:mod:`moesim.placement.eplb`): replicas one at a time to the
                           expert with the largest load per replica, then balanced packing
                           of all replicas onto all devices. No replica cap, and two copies
                           of an expert may share a device (EPLB has no rule against it)
``eplb-hierarchical``      DeepSeek EPLB's hierarchical policy as published: ``groups``
                           contiguous expert groups packed onto nodes (balanced; with one
                           group per node, group ``i`` on node ``i``), replicas made within
                           each node, packed onto its devices; EPLB's global policy when
                           the groups do not divide over the nodes
``balanced-global``        moesim's variant of ``eplb-global``: the same replica rule under
                           the replica cap, packing that avoids a second copy of an expert
                           on a device, and :func:`separate_replicas` after it; balance can
                           differ slightly from EPLB's, every replica serves a device
``balanced-hierarchical``  moesim's variant of ``eplb-hierarchical``: groups LPT-packed
                           onto nodes (also with one group per node), at most one replica
                           per device of the node, distinct devices as above; falls back to
                           ``balanced-global`` when a node cannot fill its slots so
``shadow``                 FasterMoE-style shadowing: the hottest experts are copied onto
                           every device (``D - 1`` extra slots each) while the budget lasts
                           and their load exceeds a device's mean load; the rest of the
                           budget replicates by load per replica; LPT packing (with no
                           expert that hot, the plan is ``balanced-global``'s)
``affinity``               replicas by load per replica, spread over distinct nodes;
                           experts assigned to nodes heaviest first, each to the node whose
                           experts it is most co-activated with (within tokens, and across
                           consecutive layers) among nodes still under the balanced node
                           load; LPT within each node, replicated experts' replicas joining
                           all devices into one component that a load-aware replica choice
                           can balance
=========================  =================================================================

EPLB's algorithm is implemented in :mod:`moesim.placement.eplb` from its published
description (DeepSeek, github.com/deepseek-ai/EPLB: "hierarchical load balancing ... pack
expert groups to nodes ... replicate experts within each node ... pack the replicated
experts to individual GPUs"; "global load balancing ... replicate the experts globally ...
pack the replicated experts to individual GPUs") and checked against its outputs;
FasterMoE's shadowing from He et al., PPoPP'22 (sec. 4: hot experts' parameters broadcast
to all workers).

Planners work on all layers at once: the per-item greedy loops run over item rank with
numpy operations across layers, so planning 58 layers x 256 experts takes milliseconds.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from moesim.errors import InputError
from moesim.placement.base import Placement, contiguous, sequence_deal

__all__ = [
    "STRATEGIES",
    "Strategy",
    "lpt_pack",
    "plan",
    "replicate_by_load",
    "separate_replicas",
    "slot_layout",
]

Strategy = Literal[
    "contiguous",
    "round-robin",
    "greedy",
    "eplb-hierarchical",
    "eplb-global",
    "balanced-hierarchical",
    "balanced-global",
    "shadow",
    "affinity",
]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


# ----- building blocks --------------------------------------------------------------------


def slot_layout(num_experts: int, num_devices: int, redundant: int) -> int:
    """Slots per device ``(E + redundant) / D``; an :class:`InputError` unless it is a
    whole number, at least 1, and each expert fits its replicas on distinct devices."""
    total = num_experts + redundant
    if redundant < 0:
        raise InputError("redundant slots must be >= 0", field="redundant", value=redundant)
    if total % num_devices or total < num_devices:
        raise InputError(
            f"experts + redundant slots ({num_experts} + {redundant}) must be a positive "
            f"multiple of the {num_devices} devices",
            field="redundant",
            value=redundant,
        )
    return total // num_devices


def replicate_by_load(
    weight: np.ndarray,
    num_slots: int,
    max_replicas: int | np.ndarray,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Replica counts: start at one each (or at ``start``), then add replicas one at a time
    to the expert with the largest load per replica (EPLB's rule, here under a cap and in
    float64; :func:`moesim.placement.eplb.replicate_experts` is EPLB's own).

    Args:
        weight: (B, M) load of each of M logical experts, B independent rows.
        num_slots: physical slots per row (>= M).
        max_replicas: cap on each expert's replicas, scalar or (B, M).
        start: (B, M) initial counts (default ones), each row summing to at most num_slots.
    Returns:
        (B, M) int64 replica counts, each row summing to ``num_slots``.
    """
    b, m = weight.shape
    count = np.ones((b, m), dtype=np.int64) if start is None else start.astype(np.int64)
    cap = np.broadcast_to(np.asarray(max_replicas), (b, m))
    left = num_slots - count.sum(axis=1)  # (B,)
    for _ in range(int(left.max(initial=0))):
        per = np.where(count < cap, weight / count, -np.inf)  # (B, M)
        live = np.flatnonzero(left > 0)
        count[live, np.argmax(per[live], axis=1)] += 1
        left[live] -= 1
    return count


def _items(count: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Physical replicas of each row: (B, N) expert id and (B, N) load share, N = count sum,
    sorted by load share, heaviest first (ties: lower expert id first)."""
    b, m = count.shape
    n = int(count[0].sum())
    exp = np.repeat(np.tile(np.arange(m), b), count.ravel()).reshape(b, n)
    per = np.divide(weight, count, out=np.zeros(count.shape), where=count > 0)
    share = np.take_along_axis(per, exp, axis=1)
    order = np.lexsort((exp, -share), axis=1)  # (B, N)
    return np.take_along_axis(exp, order, axis=1), np.take_along_axis(share, order, axis=1)


def lpt_pack(
    exp: np.ndarray,
    share: np.ndarray,
    num_bins: int,
    per_bin: int,
    num_experts: int,
    init_load: np.ndarray | None = None,
) -> np.ndarray:
    """Longest-processing-time packing with equal slot counts (EPLB's packing rule plus
    moesim's no-duplicate rule; :func:`moesim.placement.eplb.balanced_packing` is EPLB's
    own): items in the given order (heaviest first), each to the least-loaded bin that has
    a free slot and does not hold the same expert yet (else to the least-loaded bin with a
    free slot).

    Args:
        exp: (B, N) expert id of each item; share: (B, N) its load; N = num_bins * per_bin.
        init_load: (B, bins) load already on each bin (default zero).
    Returns:
        (B, num_bins, per_bin) int32 expert ids, each bin's slots in order of filling.
    """
    b, n = exp.shape
    rows = np.arange(b)
    load = np.zeros((b, num_bins)) if init_load is None else init_load.astype(np.float64)
    fill = np.zeros((b, num_bins), dtype=np.int64)
    hosts = np.zeros((b, num_bins, num_experts), dtype=bool)
    out = np.empty((b, num_bins, per_bin), dtype=np.int32)
    for i in range(n):
        e = exp[:, i]
        room = fill < per_bin  # (B, bins)
        ok = room & ~hosts[rows, :, e]
        ok = np.where(ok.any(axis=1, keepdims=True), ok, room)
        pick = np.argmin(np.where(ok, load, np.inf), axis=1)  # (B,)
        out[rows, pick, fill[rows, pick]] = e
        fill[rows, pick] += 1
        load[rows, pick] += share[:, i]
        hosts[rows, pick, e] = True
    return out


def separate_replicas(slots: np.ndarray, weight: np.ndarray, devices_per_node: int) -> np.ndarray:
    """``slots`` with no expert twice on one device (a second copy there serves nothing).

    Packing with equal slot counts can run out of devices that lack an expert while it
    still has replicas to place. Each second copy of expert ``x`` on device ``a`` is
    swapped with an expert ``y`` of another device ``b`` that lacks ``x``, where ``a``
    lacks ``y``: among those, ``b`` on ``a``'s node first (the node's experts stay the
    same), then the ``y`` whose load per replica is closest to ``x``'s (device loads
    barely move). Each swap removes a duplicate and adds none; passes over the devices
    repeat until no copy can move (a device stuck on one pass may be freed by a later
    swap).

    Args:
        slots: (L, D, S) expert ids; weight: (L, E) expert loads.
    Returns:
        (L, D, S) slots; the input itself where it has no duplicate.
    """
    ordered = np.sort(slots, axis=2)
    dup = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)  # (L, D)
    if not dup.any():
        return slots
    out = slots.copy()
    e = weight.shape[1]
    node = np.arange(slots.shape[1]) // devices_per_node
    for li in np.flatnonzero(dup.any(axis=1)):
        count = np.bincount(out[li].ravel(), minlength=e)
        per = np.divide(weight[li], count, out=np.zeros(e), where=count > 0)
        swapped = True
        while swapped:  # until no device has a copy it can give away
            swapped = False
            for a in range(out.shape[1]):
                while _swap_second_copy(out[li], a, per, node):
                    swapped = True
    return out


def _swap_second_copy(slots: np.ndarray, a: int, per: np.ndarray, node: np.ndarray) -> bool:
    """Swap one second copy on device ``a`` of (D, S) ``slots`` in place (see
    :func:`separate_replicas`); False when ``a`` has none, or none that can move now."""
    values, times = np.unique(slots[a], return_counts=True)
    for x in values[times > 1].tolist():
        lacks_x = ~(slots == x).any(axis=1)  # (D,)
        free = lacks_x[:, None] & ~np.isin(slots, slots[a])  # (D, S): swappable experts
        if not free.any():
            continue
        bs, ss = np.nonzero(free)
        key = np.lexsort((np.abs(per[slots[bs, ss]] - per[x]), node[bs] != node[a]))
        b, sb = int(bs[key[0]]), int(ss[key[0]])
        sa = int(np.flatnonzero(slots[a] == x)[1])
        slots[a, sa], slots[b, sb] = slots[b, sb], x
        return True
    return False


# ----- planners -----------------------------------------------------------------------------


def _round_robin(num_layers: int, e: int, d: int, s: int) -> np.ndarray:
    """(L, D, S): slot p of the sequence 0, 1, ..., E-1, 0, 1, ... on device p mod D."""
    seq = np.arange(d * s) % e
    one = sequence_deal(seq, d, s, np.arange(d * s) % d)
    return np.broadcast_to(one, (num_layers, d, s)).copy()


def _greedy(w: np.ndarray, d: int, s: int) -> np.ndarray:
    """(L, D, S): one extra replica for each of the ``D*S - E`` heaviest experts (cycling
    through the experts again when the budget exceeds E), then LPT over all devices."""
    num_layers, e = w.shape
    order = np.argsort(-w, axis=1, kind="stable")  # (L, E)
    count = np.ones((num_layers, e), dtype=np.int64)
    rows = np.arange(num_layers)
    for i in range(d * s - e):
        count[rows, order[:, i % e]] += 1
    exp, share = _items(count, w)
    return lpt_pack(exp, share, d, s, e)


def _eplb(w: np.ndarray, nodes: int, g: int, s: int, groups: int) -> np.ndarray:
    """(L, D, S): DeepSeek EPLB's :func:`moesim.placement.eplb.rebalance` (hierarchical when
    ``groups`` is a multiple of ``nodes``, else global), its slots GPU-major."""
    from moesim.placement.eplb import rebalance

    phy2log, _ = rebalance(w, nodes * g * s, groups, nodes, nodes * g)
    return phy2log.reshape(w.shape[0], nodes * g, s).astype(np.int32)


def _balanced_global(w: np.ndarray, d: int, s: int, max_rep: int) -> np.ndarray:
    """(L, D, S): replicas by load per replica under the cap, then LPT packing onto all
    devices avoiding a second copy of an expert on a device."""
    e = w.shape[1]
    count = replicate_by_load(w, d * s, max_rep)
    exp, share = _items(count, w)
    return lpt_pack(exp, share, d, s, e)


def _balanced_hierarchical(
    w: np.ndarray, nodes: int, g: int, s: int, groups: int, max_rep: int
) -> np.ndarray:
    """(L, D, S): contiguous expert groups packed onto nodes (balanced, equal group counts),
    then within each node replicas by load per replica and LPT onto its ``g`` devices.

    Falls back to ``balanced-global`` when the groups do not divide evenly over the nodes
    (as EPLB does), or when a node's experts cannot fill its slots with at most
    ``min(max_rep, g)`` replicas each (one per device of the node).
    """
    num_layers, e = w.shape
    if groups % nodes or e % groups or (s * g * nodes - e) % nodes:
        return _balanced_global(w, nodes * g, s, max_rep)
    if (e // nodes) * min(max_rep, g) < g * s:
        return _balanced_global(w, nodes * g, s, max_rep)
    per_group = e // groups
    gw = w.reshape(num_layers, groups, per_group).sum(axis=2)  # (L, groups)
    gexp, gshare = _items(np.ones_like(gw, dtype=np.int64), gw)
    node_groups = lpt_pack(gexp, gshare, nodes, groups // nodes, groups)  # (L, nodes, gpn)
    # logical experts of each node, (L * nodes, E / nodes)
    members = (node_groups[..., None] * per_group + np.arange(per_group)).reshape(
        num_layers * nodes, -1
    )
    mw = np.take_along_axis(np.repeat(w, nodes, axis=0), members, axis=1)
    count = replicate_by_load(mw, g * s, min(max_rep, g))
    exp, share = _items(count, mw)
    local = lpt_pack(exp, share, g, s, members.shape[1])  # (L * nodes, g, s) local ids
    glob = np.take_along_axis(members, local.reshape(num_layers * nodes, -1), axis=1)
    return glob.reshape(num_layers, nodes * g, s).astype(np.int32)


def _shadow(w: np.ndarray, d: int, s: int, max_rep: int) -> np.ndarray:
    """(L, D, S): the hottest experts get a replica on every device (FasterMoE's shadowing,
    ``min(D, max_replicas)`` copies) while the budget lasts and the expert's load exceeds a
    device's mean load; the leftover budget goes by load per replica; LPT packing."""
    num_layers, e = w.shape
    full = min(d, max_rep)
    count = np.ones((num_layers, e), dtype=np.int64)
    if full > 1:
        order = np.argsort(-w, axis=1, kind="stable")
        rows = np.arange(num_layers)
        mean_dev = w.sum(axis=1) / d  # (L,)
        for i in range(min((d * s - e) // (full - 1), e)):
            col = order[:, i]
            hot = w[rows, col] > mean_dev
            count[rows[hot], col[hot]] = full
    count = replicate_by_load(w, d * s, max_rep, start=count)
    # every device's first slots hold the experts on all devices; LPT fills the rest
    # (layers grouped by how many experts are everywhere)
    everywhere = count == d  # (L, E)
    ks = everywhere.sum(axis=1)
    out = np.empty((num_layers, d, s), dtype=np.int32)
    for k in np.unique(ks).tolist():
        rows = np.flatnonzero(ks == k)
        ev = np.nonzero(everywhere[rows])[1].reshape(rows.size, k)  # (B, k)
        rest = count[rows].copy()
        np.put_along_axis(rest, ev, 0, axis=1)
        init = np.repeat((np.take_along_axis(w[rows], ev, axis=1) / d).sum(axis=1), d)
        exp, share = _items(rest, w[rows])
        out[rows, :, :k] = ev[:, None, :]
        out[rows, :, k:] = lpt_pack(exp, share, d, s - k, e, init.reshape(rows.size, d))
    return out


def _assign_nodes(
    exp: np.ndarray,
    share: np.ndarray,
    nodes: int,
    per_node: int,
    num_experts: int,
    coact: np.ndarray | None,
    cross: np.ndarray | None,
    cross_weight: float,
    tolerance: float,
) -> np.ndarray:
    """Node of each replica, one greedy pass over the replicas (heaviest first), all layers
    at once (see :func:`_affinity`).

    Args:
        exp, share: (L, N) replicas, heaviest first.
        coact: (L, E, E) symmetric co-activation counts, or None.
        cross: (L-1, E, E) tokens from expert i at layer l to expert j at layer l+1, or None.
    Returns:
        (L, N) node of each replica.
    """
    from moesim.placement._compiled import assign_nodes_kernel

    e = num_experts
    empty = np.zeros((0, e), dtype=np.float32)
    co = empty if coact is None else np.ascontiguousarray(coact, dtype=np.float32).reshape(-1, e)
    x = empty if cross is None else np.ascontiguousarray(cross, dtype=np.float32).reshape(-1, e)
    node_of = assign_nodes_kernel(
        np.ascontiguousarray(exp.T, dtype=np.int64),
        np.ascontiguousarray(share.T, dtype=np.float64),
        np.ascontiguousarray((tolerance * share).T, dtype=np.float64),
        nodes,
        per_node,
        e,
        co,
        x,
        np.float32(cross_weight),
        float(share.sum(axis=1).max()) + 1.0,
    )
    return np.ascontiguousarray(node_of.T)


def _affinity(
    w: np.ndarray,
    nodes: int,
    g: int,
    s: int,
    max_rep: int,
    coact: np.ndarray | None,
    cross: np.ndarray | None,
    cross_weight: float,
    tolerance: float,
) -> np.ndarray:
    """(L, D, S), see the module docstring.

    Replica counts by load per replica (as EPLB). Node assignment runs over replicas in
    order of load share (heaviest first), all layers at once, in one pass. A replica may go
    to a node with a free slot that does not host its expert yet (while one exists) and
    whose load exceeds the least-loaded such node's by at most ``tolerance`` times the
    replica's load (LPT's rule, loosened); among those, the one with the most affinity:
    co-activation counts with the experts already on the node, plus ``cross_weight`` times
    the tokens going from the previous layer's experts already on the node to this expert;
    ties go to the least-loaded node.

    Devices: the replicas of replicated experts are packed first, LPT onto their node's
    devices, joining *flex components*
    (:func:`moesim.placement._compiled.pack_connected_kernel`): devices
    sharing a replicated expert form a component, within which a load-aware replica choice
    (``batch-split``) can shift a batch's load; ``D - 1`` redundant slots can join all
    devices into one, so that it absorbs a batch's deviations from the planned loads
    instead of leaving them on the device they fall on. The single replicas are then
    LPT-packed within each node.
    """
    num_layers, e = w.shape
    d = nodes * g
    count = replicate_by_load(w, d * s, max_rep)
    exp, share = _items(count, w)  # (L, N)
    n = exp.shape[1]
    node_of = _assign_nodes(exp, share, nodes, g * s, e, coact, cross, cross_weight, tolerance)
    replicated = np.take_along_axis(count, exp, axis=1) > 1  # (L, N)
    cols = np.flatnonzero(replicated.any(axis=0))
    m = int(cols[-1]) + 1 if cols.size else 0  # up to the last replicated one
    from moesim.placement._compiled import pack_connected_kernel

    out, fill, load = pack_connected_kernel(
        np.ascontiguousarray(exp[:, :m], dtype=np.int64),
        np.ascontiguousarray(share[:, :m], dtype=np.float64),
        np.ascontiguousarray(node_of[:, :m], dtype=np.int64),
        np.ascontiguousarray(replicated[:, :m], dtype=np.bool_),
        nodes,
        g,
        s,
        e,
    )
    if m < n:
        # the rest, per (layer, node) row: its items heaviest first, padded to equal length
        rest_node = node_of[:, m:]
        order = np.argsort(rest_node, axis=1, kind="stable")  # by node, then by load
        r_exp = np.take_along_axis(exp[:, m:], order, axis=1)
        r_share = np.take_along_axis(share[:, m:], order, axis=1)
        r_node = np.take_along_axis(rest_node, order, axis=1)
        per_row = np.zeros((num_layers, nodes), dtype=np.int64)
        np.add.at(per_row, (np.repeat(np.arange(num_layers), n - m), r_node.ravel()), 1)
        width = int(per_row.max())
        start = np.cumsum(per_row, axis=1) - per_row  # (L, nodes)
        pos = np.arange(n - m)[None, :] - np.take_along_axis(start, r_node, axis=1)
        row = np.arange(num_layers)[:, None] * nodes + r_node  # (L, n - m)
        pe = np.full((num_layers * nodes, width), -1, dtype=np.int64)
        ps = np.zeros((num_layers * nodes, width))
        pe[row, pos] = r_exp
        ps[row, pos] = r_share
        out = _pack_rest(
            out.reshape(num_layers * nodes, g, s),
            fill.reshape(num_layers * nodes, g),
            load.reshape(num_layers * nodes, g),
            pe,
            ps,
            e,
        ).reshape(num_layers, d, s)
    return out


def _pack_rest(
    out: np.ndarray,
    fill: np.ndarray,
    load: np.ndarray,
    exp: np.ndarray,
    share: np.ndarray,
    num_experts: int,
) -> np.ndarray:
    """LPT of the remaining items of each row onto its bins' free slots, each to the
    least-loaded bin with a free slot that does not hold its expert yet (else any with a
    free slot).

    Args:
        out: (B, bins, S) slots so far (-1 free), filled in order; fill, load: (B, bins).
        exp, share: (B, W) items heaviest first, padded with expert -1.
    Returns:
        (B, bins, S) with every slot filled.
    """
    b, bins, s = out.shape
    out, fill, load = out.copy(), fill.copy(), load.astype(np.float64)
    rows = np.arange(b)
    hosts = np.zeros((b, bins, num_experts + 1), dtype=bool)
    hosts[np.repeat(rows, bins * s), np.tile(np.repeat(np.arange(bins), s), b), out.ravel()] = True
    for i in range(exp.shape[1]):
        live = np.flatnonzero(exp[:, i] >= 0)
        if not live.size:
            break
        e = exp[live, i]
        room = fill[live] < s
        ok = room & ~hosts[live, :, e]
        ok = np.where(ok.any(axis=1, keepdims=True), ok, room)
        pick = np.argmin(np.where(ok, load[live], np.inf), axis=1)
        out[live, pick, fill[live, pick]] = e
        fill[live, pick] += 1
        load[live, pick] += share[live, i]
        hosts[live, pick, e] = True
    return out


# ----- entry point ---------------------------------------------------------------------------


def ready(strategy: str) -> None:
    """Load what ``strategy`` needs before a plan is timed: the affinity planner's compiled
    kernels (see :func:`moesim.placement._compiled.load_kernels`); nothing for the others."""
    if strategy == "affinity":
        from moesim.placement._compiled import load_kernels

        load_kernels()


def plan(
    loads: np.ndarray,
    strategy: str,
    *,
    nodes: int,
    devices_per_node: int,
    redundant: int = 0,
    max_slots_per_device: int | None = None,
    max_replicas: int | None = None,
    groups: int | None = None,
    coactivation: np.ndarray | None = None,
    cross_layer: np.ndarray | None = None,
    cross_weight: float = 0.5,
    tolerance: float = 0.5,
) -> Placement:
    """Plan a placement of every layer's experts.

    Args:
        loads: (L, E) load of each logical expert per layer (assignments, or any weights).
        strategy: one of :data:`STRATEGIES`.
        nodes, devices_per_node: the cluster; D = nodes * devices_per_node devices.
        redundant: extra slots in total per layer; every device gets ``(E + redundant) / D``.
        max_slots_per_device: memory bound (expert slots that fit a device's HBM, see
            :func:`moesim.placement.memory.max_expert_slots`); exceeding it is an InputError.
        max_replicas: replicas per expert at most (default: D, one per device); refused
            by ``eplb-global`` and ``eplb-hierarchical``, which have no cap, as EPLB.
        groups: contiguous expert groups for ``eplb-hierarchical`` and
            ``balanced-hierarchical`` (EPLB's ``num_groups``; a divisor of E; default: one
            per node, or for ``eplb-hierarchical`` the global policy when the nodes do not
            divide E); an InputError with any other strategy.
        coactivation: (L, E, E) tokens choosing both experts i and j in a layer, symmetric
            (:func:`moesim.placement.affinity.coactivation`), for ``affinity``.
        cross_layer: (L-1, E, E) tokens choosing expert i at layer l and j at layer l+1,
            for ``affinity``.
        cross_weight: weight of the cross-layer term against co-activation (``affinity``).
        tolerance: a replica may go to a node whose load exceeds the least-loaded one's by
            this many times the replica's load, if it has more affinity (``affinity``).
    Returns:
        :class:`Placement` with slots (L, D, S).
    """
    w = np.asarray(loads, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise InputError("loads must be a (layers, experts) array", field="loads", value=w.shape)
    if not np.isfinite(w).all() or (w < 0).any():
        raise InputError("loads must be finite and >= 0", field="loads")
    if strategy not in STRATEGIES:
        raise InputError(
            f"unknown strategy; valid: {', '.join(STRATEGIES)}", field="strategy", value=strategy
        )
    if nodes < 1 or devices_per_node < 1:
        raise InputError("need at least one node and device", field="nodes", value=nodes)
    num_layers, e = w.shape
    d = nodes * devices_per_node
    if strategy == "contiguous" and redundant == 0 and d > e and d % e == 0:
        redundant = d - e  # expert-data parallelism, as the simulator's contiguous placement
    s = slot_layout(e, d, redundant)
    if max_slots_per_device is not None and s > max_slots_per_device:
        raise InputError(
            f"{s} expert slots per device exceed the {max_slots_per_device} that fit in memory",
            field="redundant",
            value=redundant,
        )
    eplb = strategy in ("eplb-global", "eplb-hierarchical")
    if eplb and max_replicas is not None:
        raise InputError(
            f"{strategy} follows DeepSeek EPLB, which has no replica cap; "
            f"balanced-{strategy[5:]} keeps one",
            field="max_replicas",
            value=max_replicas,
        )
    if groups is not None:
        if strategy not in ("eplb-hierarchical", "balanced-hierarchical"):
            raise InputError(
                "expert groups are for eplb-hierarchical and balanced-hierarchical",
                field="groups",
                value=groups,
            )
        if groups < 1 or e % groups:
            raise InputError(
                f"expert groups must divide the {e} experts", field="groups", value=groups
            )
    max_rep = d if max_replicas is None else max(1, min(max_replicas, d))
    if not eplb and e * max_rep < d * s:
        raise InputError(
            f"{d * s} slots cannot be filled with at most {max_rep} replicas of {e} experts"
            + ("" if max_replicas is not None else " (one per device)"),
            field="max_replicas" if max_replicas is not None else "redundant",
            value=max_replicas if max_replicas is not None else redundant,
        )
    w = w + 1e-12 * (w.sum(axis=1, keepdims=True) == 0)  # an all-zero layer: even weights
    if strategy == "contiguous":
        slots = contiguous(e, d, num_layers, redundant=redundant).slots
    elif strategy == "round-robin":
        slots = _round_robin(num_layers, e, d, s)
    elif strategy == "greedy":
        slots = _greedy(w, d, s)
    elif strategy == "eplb-global":
        slots = _eplb(w, nodes, devices_per_node, s, 1)
    elif strategy == "eplb-hierarchical":
        # without groups: one per node, or the global policy where that does not divide E
        n_groups = groups or (nodes if e % nodes == 0 else 1)
        slots = _eplb(w, nodes, devices_per_node, s, n_groups)
    elif strategy == "balanced-global":
        slots = _balanced_global(w, d, s, max_rep)
    elif strategy == "balanced-hierarchical":
        slots = _balanced_hierarchical(w, nodes, devices_per_node, s, groups or nodes, max_rep)
    elif strategy == "shadow":
        slots = _shadow(w, d, s, max_rep)
    else:
        for name, arr, want in (
            ("coactivation", coactivation, (num_layers, e, e)),
            ("cross_layer", cross_layer, (num_layers - 1, e, e)),
        ):
            if arr is not None and np.shape(arr) != want:
                raise InputError(f"expected shape {want}", field=name, value=np.shape(arr))
        slots = _affinity(
            w,
            nodes,
            devices_per_node,
            s,
            max_rep,
            coactivation,
            cross_layer if num_layers > 1 else None,
            cross_weight,
            tolerance,
        )
    if not eplb:
        slots = separate_replicas(np.asarray(slots), w, devices_per_node)
    return Placement(slots=np.ascontiguousarray(slots, dtype=np.int32), num_experts=e)
