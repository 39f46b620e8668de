"""DeepSeek EPLB's expert-parallel load balancer, as published: three pure functions over
arrays and one entry point, :func:`rebalance`.

Implemented from the algorithm DeepSeek published (github.com/deepseek-ai/EPLB, README and
``eplb.py``'s docstrings), vectorised over layers; checked against the outputs of
DeepSeek's own code on eight inputs (``tests/test_eplb.py``). Its choices, kept here:

- arithmetic in float32 (EPLB casts the weights to float32);
- :func:`balanced_packing` sorts items heaviest first (equal weights in the order EPLB's
  unstable sort leaves them, :func:`_introsort_order`) and puts
  each on the least-loaded pack (ties: lower pack) among packs with a free place; it has
  no rule against two copies of one expert in one pack, and with one item per pack it
  keeps the items in order (item ``i`` to pack ``i``);
- :func:`replicate_experts` adds replicas one at a time to the expert with the largest
  load per replica (ties: lower index), with no cap on an expert's replicas;
- :func:`rebalance` uses the hierarchical policy when the groups divide over the nodes,
  otherwise the global one (the hierarchical policy on one group and one node).

Physical slots are numbered GPU-major: GPU ``g`` holds slots ``[g*S, (g+1)*S)``, in the
order its pack received them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["balanced_packing", "rebalance", "rebalance_hierarchical", "replicate_experts"]


def _inverse(perm: np.ndarray) -> np.ndarray:
    """(B, N) inverse of each row's permutation."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


_SMALL = 16  # ranges of at most this many items are left to the final insertion sort


def _introsort_order(keys: list[float]) -> list[int]:
    """Indices of ``keys`` heaviest first, equal keys in the order an introsort leaves them:
    median-of-three pivot moved to the front, Hoare partition, the larger-index part
    sorted first, then one insertion sort over the whole (the first 16 items guarded).

    This is the tie order of EPLB's (unstable) descending sort on CPU, checked against
    its outputs. Past the introsort's depth limit (2 log2 N levels, not reached by the
    inputs at hand) a range is ordered stably instead, which can only move equal keys:
    the loads packed are the same.
    """
    a = list(range(len(keys)))

    def before(x: int, y: int) -> bool:  # x sorts before y
        return keys[x] > keys[y]

    def partition(lo: int, hi: int) -> int:
        """Partition a[lo+1:hi] around the pivot a[lo]; the start of the right part."""
        i, j = lo + 1, hi
        while True:
            while before(a[i], a[lo]):
                i += 1
            j -= 1
            while before(a[lo], a[j]):
                j -= 1
            if i >= j:
                return i
            a[i], a[j] = a[j], a[i]
            i += 1

    def pivot_to_front(lo: int, hi: int) -> None:
        x, y, z = lo + 1, lo + (hi - lo) // 2, hi - 1
        if before(a[x], a[y]):
            m = y if before(a[y], a[z]) else (z if before(a[x], a[z]) else x)
        else:
            m = x if before(a[x], a[z]) else (z if before(a[y], a[z]) else y)
        a[lo], a[m] = a[m], a[lo]

    def introsort(lo: int, hi: int, depth: int) -> None:
        while hi - lo > _SMALL:
            if depth == 0:
                a[lo:hi] = sorted(a[lo:hi], key=lambda i: (-keys[i], i))
                return
            depth -= 1
            pivot_to_front(lo, hi)
            cut = partition(lo, hi)
            introsort(cut, hi, depth)
            hi = cut

    n = len(a)
    introsort(0, n, 2 * (n.bit_length() - 1))
    for i in range(1, n):  # insertion sort: each item moves left past heavier-keyed ones
        v, j = a[i], i
        while j > 0 and before(v, a[j - 1]):
            a[j] = a[j - 1]
            j -= 1
        a[j] = v
    return a


def _descending(weight: np.ndarray) -> np.ndarray:
    """(B, N) item order of each row, heaviest first, ties as EPLB's sort leaves them
    (:func:`_introsort_order`; rows without ties, or short ones, in stable order)."""
    order = np.argsort(-weight, axis=1, kind="stable")
    if weight.shape[1] <= _SMALL:
        return order
    ordered = np.take_along_axis(weight, order, axis=1)
    for r in np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)).tolist():
        order[r] = _introsort_order(weight[r].tolist())
    return order


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack N items into ``num_packs`` packs of N / num_packs items each, balancing loads.

    Items go heaviest first (equal weights in the order of EPLB's sort, see
    :func:`_descending`), each to the least-loaded pack (ties: lower pack) with a free place.

    Args:
        weight: (B, N) float32 item weights, B independent rows; N a multiple of num_packs.
    Returns:
        pack: (B, N) int64 pack of each item; rank: (B, N) int64 its place in the pack,
        in order of arrival.
    """
    b, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (b, 1)), np.zeros((b, n), dtype=np.int64)
    rows = np.arange(b)
    order = _descending(weight)  # (B, N) heaviest first
    load = np.zeros((b, num_packs), dtype=np.float32)
    fill = np.zeros((b, num_packs), dtype=np.int64)
    pack = np.empty((b, n), dtype=np.int64)
    rank = np.empty((b, n), dtype=np.int64)
    for i in range(n):
        item = order[:, i]  # (B,)
        pick = np.argmin(np.where(fill < per_pack, load, np.inf), axis=1)  # (B,)
        pack[rows, item] = pick
        rank[rows, item] = fill[rows, pick]
        fill[rows, pick] += 1
        load[rows, pick] += weight[rows, item]
    return pack, rank


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicas of M logical experts filling ``num_phy`` physical slots.

    Every expert starts with one replica (physical slot ``j < M`` is expert ``j``); each
    further slot goes to the expert with the largest load per replica (ties: lower index).

    Args:
        weight: (B, M) float32 expert loads.
    Returns:
        phy2log: (B, num_phy) int64 expert of each physical slot; logcnt: (B, M) int64
        replicas of each expert.
    """
    b, m = weight.shape
    rows = np.arange(b)
    phy2log = np.tile(np.arange(num_phy) % m, (b, 1))
    logcnt = np.ones((b, m), dtype=np.int64)
    for i in range(m, num_phy):
        best = np.argmax(weight / logcnt.astype(np.float32), axis=1)  # (B,)
        phy2log[:, i] = best
        logcnt[rows, best] += 1
    return phy2log, logcnt


def rebalance_hierarchical(
    weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy.

    Args:
        weight: (L, E) float32 loads; E a multiple of num_groups, num_groups of num_nodes,
            num_gpus of num_nodes, num_phy of num_gpus.
    Returns:
        phy2log: (L, num_phy) int64, GPU-major; logcnt: (L, E) int64.
    """
    num_layers, e = weight.shape
    group_size = e // num_groups
    groups_per_node = num_groups // num_nodes
    per_node = e // num_nodes  # logical experts per node
    per_gpu = num_phy // num_gpus

    # Step 1: pack expert groups onto nodes. An expert's "node-major" id (mlog) is its
    # place among the experts of the nodes in order, groups in their order in the pack.
    group_w = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)  # (L, G)
    g_pack, g_rank = balanced_packing(group_w, num_nodes)
    first = (g_pack * groups_per_node + g_rank) * group_size  # (L, G)
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(num_layers, e)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate each node's experts to fill the node's physical slots.
    mlog_w = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, per_node)  # (L*N, E/N)
    phy2mlog, mlogcnt = replicate_experts(mlog_w, num_phy // num_nodes)

    # Step 3: pack each node's physical experts (load / replicas) onto its GPUs.
    share = mlog_w / mlogcnt.astype(np.float32)
    phy_w = np.take_along_axis(share, phy2mlog, axis=1)  # (L*N, P/N)
    pack, rank = balanced_packing(phy_w, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * per_node)[None, :, None]).reshape(
        num_layers, -1
    )
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, e), log2mlog, axis=1)
    return phy2log, logcnt


def rebalance(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's entry point: the hierarchical policy when ``num_groups`` is a multiple of
    ``num_nodes``, else the global policy (hierarchical on one group and one node).

    Args:
        weight: (L, E) loads (cast to float32).
        num_replicas: physical slots per layer, a multiple of ``num_gpus``, at least E.
    Returns:
        phy2log: (L, num_replicas) int64 expert of each slot, GPU-major;
        logcnt: (L, E) int64 replicas of each expert.
    """
    w = np.asarray(weight, dtype=np.float32)
    if num_groups % num_nodes == 0:
        return rebalance_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    return rebalance_hierarchical(w, num_replicas, 1, 1, num_gpus)
