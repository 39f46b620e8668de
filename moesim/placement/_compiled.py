"""The affinity planner's node assignment, compiled (numba).

A greedy pass over replicas whose every step depends on the previous ones cannot be one
numpy expression; as numpy calls over the layers it spent about 70 µs per replica in call
overheads (25 of the 40 ms a 58 x 256 plan took). Compiled, the same arithmetic runs in
about a millisecond. It is imported lazily (numba takes a moment to import) and cached on
disk after its first compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["assign_nodes_kernel"]


@njit(cache=True)
def assign_nodes_kernel(  # pragma: no cover - compiled; tested through planners._assign_nodes
    exp_t: np.ndarray,
    share_t: np.ndarray,
    slack_t: np.ndarray,
    nodes: int,
    per_node: int,
    num_experts: int,
    co: np.ndarray,
    x: np.ndarray,
    cross_weight: np.float32,
    big: float,
) -> np.ndarray:
    """Node of each replica; see :func:`moesim.placement.planners._assign_nodes`, whose
    numpy form this follows operation for operation (the same float32 sums and the same
    ties), so both give the same plan.

    Args:
        exp_t, share_t, slack_t: (N, L) replica i's expert, load share and slack per layer.
        co: (L * E, E) float32 co-activation rows, or (0, E) for none.
        x: ((L - 1) * E, E) float32 cross-layer rows, or (0, E) for none.
    Returns:
        (N, L) node of each replica.
    """
    n, num_layers = exp_t.shape
    e = num_experts
    key_load = np.zeros(num_layers * nodes)
    fill = np.zeros(num_layers * nodes, dtype=np.int64)
    hosted = np.zeros(num_layers * e * nodes)
    aff = np.zeros((num_layers * nodes, e), dtype=np.float32)
    has_co = co.shape[0] > 0
    has_x = x.shape[0] > 0
    node_of = np.empty((n, num_layers), dtype=np.int64)
    keys = np.empty(nodes)
    for i in range(n):
        for layer in range(num_layers):
            ex = exp_t[i, layer]
            at = layer * e + ex
            row = layer * nodes
            least = np.inf
            for nd in range(nodes):
                k = key_load[row + nd] + hosted[at * nodes + nd]
                keys[nd] = k
                if k < least:
                    least = k
            limit = least + slack_t[i, layer]
            best = -np.inf
            pick = 0
            for nd in range(nodes):
                v = -np.inf
                if keys[nd] <= limit:
                    v = np.float64(aff[row + nd, ex]) - 1e-9 * keys[nd]
                if v > best:
                    best = v
                    pick = nd
            node_of[i, layer] = pick
        # every layer's pick is made before any layer's state changes, and the affinity
        # sums are added in numpy's order (all co-activation rows, then all cross-layer
        # rows), so that float32 rounding, and hence every tie, is the same
        for layer in range(num_layers):
            pick = node_of[i, layer]
            at = layer * e + exp_t[i, layer]
            r = layer * nodes + pick
            f = fill[r] + 1
            fill[r] = f
            key_load[r] += share_t[i, layer] + (0.0 if f < per_node else np.inf)
            hosted[at * nodes + pick] += big
            if has_co:
                for j in range(e):
                    aff[r, j] += co[at, j]
        if has_x:
            for layer in range(num_layers - 1):
                at = layer * e + exp_t[i, layer]
                r = (layer + 1) * nodes + node_of[i, layer]
                for j in range(e):
                    aff[r, j] += cross_weight * x[at, j]
    return node_of


@njit(cache=True)
def pack_connected_kernel(  # pragma: no cover - compiled; tested through planners
    exp: np.ndarray,
    share: np.ndarray,
    node_of: np.ndarray,
    replicated: np.ndarray,
    nodes: int,
    g: int,
    s: int,
    num_experts: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicas onto devices of their node, LPT, joining flex components (see
    :func:`moesim.placement.planners._affinity`): a replica of an expert whose first
    replica is already placed prefers the least-loaded device of its node outside that
    replica's component; the two components then merge. Layers are independent, so they
    run one after the other; the numpy specification (all layers at once) is in the tests.

    Args:
        exp, share, node_of: (L, M) replicas, heaviest first, and their nodes (int64,
            float64, int64); replicated: (L, M) bool, the replica's expert has more than one.
    Returns:
        out: (L, D, S) experts placed (unfilled slots -1); fill: (L, D) slots used;
        load: (L, D) load placed.
    """
    num_layers, m = exp.shape
    d = nodes * g
    load = np.zeros((num_layers, d))
    fill = np.zeros((num_layers, d), dtype=np.int64)
    out = np.full((num_layers, d, s), -1, dtype=np.int32)
    key_load = np.zeros(d)
    hosted = np.zeros((num_experts, d), dtype=np.bool_)
    first = np.empty(num_experts, dtype=np.int64)
    comp = np.empty(d, dtype=np.int64)
    key = np.empty(g)
    near = np.empty(g, dtype=np.bool_)
    for layer in range(num_layers):
        key_load[:] = 0.0
        hosted[:, :] = False
        first[:] = -1
        for dev in range(d):
            comp[dev] = dev
        for i in range(m):
            ei = exp[layer, i]
            sh = share[layer, i]
            lo = node_of[layer, i] * g
            any_free = False
            for j in range(g):
                key[j] = np.inf if hosted[ei, lo + j] else key_load[lo + j]
                any_free = any_free or key[j] < np.inf
            if not any_free:  # the node's devices with a free slot all host it: a second
                for j in range(g):  # copy, which planners.separate_replicas moves later
                    key[j] = key_load[lo + j]
            f = first[ei]
            joins = replicated[layer, i] and f >= 0
            fc = -1
            if joins:
                fc = comp[f]
                least = key[0]
                for j in range(1, g):
                    if key[j] < least:
                        least = key[j]
                any_near = False
                for j in range(g):
                    near[j] = comp[lo + j] != fc and key[j] <= least + sh
                    any_near = any_near or near[j]
                if any_near:
                    for j in range(g):
                        if not near[j]:
                            key[j] = np.inf
            best = 0
            for j in range(1, g):
                if key[j] < key[best]:
                    best = j
            pick = lo + best
            fp = fill[layer, pick]
            if fp >= s:  # (cannot happen: the node was chosen with a free slot)
                raise ValueError("no free slot on the replica's node")
            out[layer, pick, fp] = ei
            fill[layer, pick] = fp + 1
            load[layer, pick] += sh
            key_load[pick] = load[layer, pick] if fp + 1 < s else np.inf
            hosted[ei, pick] = True
            if joins:
                old = comp[pick]
                for dev in range(d):
                    if comp[dev] == old:
                        comp[dev] = fc
            if f < 0:
                first[ei] = pick
    return out, fill, load


def load_kernels() -> None:
    """Compile the kernels, or load them from numba's on-disk cache, by running each once
    on a tiny input of the argument types the planners pass (about 0.6 s from the cache,
    4 s to compile on a new checkout), so that the first plan timed is not charged for it."""
    exp = np.zeros((1, 1), dtype=np.int64)
    share = np.ones((1, 1))
    rows = np.zeros((0, 1), dtype=np.float32)
    assign_nodes_kernel(exp, share, share, 1, 1, 1, rows, rows, np.float32(0.5), 2.0)
    pack_connected_kernel(exp, share, exp, np.zeros((1, 1), dtype=np.bool_), 1, 1, 1, 1)
