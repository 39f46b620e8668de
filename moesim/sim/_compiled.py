"""The flow tier's max-min solver and the fabric's drain loop, compiled (numba).

The same arithmetic as the numpy forms kept in ``tests/test_topology_flows.py`` (the
max-min rates bit for bit; drain times within rounding, the clock's sums running in
another order); compiled, thousands of flows cost no numpy call overheads per round or
event (at 32 devices those were most of a training step's 5 s). Imported lazily (numba
takes a moment to import) and cached on disk after its first compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.sim.flows import _TIE

__all__ = ["fabric_kernel", "maxmin_kernel"]


@njit(cache=True)
def maxmin_kernel(  # pragma: no cover - compiled; tested through moesim.sim.flows
    ptr: np.ndarray,
    links: np.ndarray,
    weight: np.ndarray,
    capacity: np.ndarray,
    rel_tol: float,
    act: np.ndarray,
) -> np.ndarray:
    """Max-min rates of flows ``act`` (indices, in order; each with at least one link and
    a positive weight): flow f crosses ``links[ptr[f]:ptr[f+1]]``; see
    :func:`moesim.sim.flows._maxmin`. Returns (len(act),) rates."""
    n_links = capacity.size
    n = act.size
    rate = np.empty(n)
    remaining = capacity.astype(np.float64).copy()
    alive = np.ones(n, dtype=np.bool_)
    # each link's flows (positions in act), and its load: both built once, the load then
    # lowered as flows freeze (weights are whole counts, so the sums stay exact)
    lptr = np.zeros(n_links + 1, dtype=np.int64)
    load = np.zeros(n_links)
    for i in range(n):
        f = act[i]
        for j in range(ptr[f], ptr[f + 1]):
            lptr[links[j] + 1] += 1
            load[links[j]] += weight[f]
    for link in range(n_links):
        lptr[link + 1] += lptr[link]
    fill = lptr[:-1].copy()
    lflows = np.empty(lptr[-1], dtype=np.int64)
    for i in range(n):
        f = act[i]
        for j in range(ptr[f], ptr[f + 1]):
            lflows[fill[links[j]]] = i
            fill[links[j]] += 1
    saturated = np.zeros(n_links, dtype=np.bool_)
    live = n
    level = 0.0
    tol = 1.0 + max(rel_tol, _TIE)
    while live:
        inc = np.inf
        for link in range(n_links):
            if load[link] > 0:
                share = remaining[link] / load[link]
                if share < inc:
                    inc = share
        limit = (level + inc) * tol + 1e-300
        for link in range(n_links):
            saturated[link] = False
            if load[link] > 0:
                share = remaining[link] / load[link]
                remaining[link] -= inc * load[link]
                saturated[link] = level + share <= limit
        level += inc
        for link in range(n_links):
            if not saturated[link]:
                continue
            for q in range(lptr[link], lptr[link + 1]):
                i = lflows[q]
                if alive[i]:
                    rate[i] = level
                    alive[i] = False
                    live -= 1
                    f = act[i]
                    for j in range(ptr[f], ptr[f + 1]):
                        load[links[j]] -= weight[f]
    return rate


@njit(cache=True)
def fabric_kernel(  # pragma: no cover - compiled; tested through moesim.sim.fabric
    ptr: np.ndarray,
    links: np.ndarray,
    weight: np.ndarray,
    capacity: np.ndarray,
    rel_tol: float,
    act: np.ndarray,
    left: np.ndarray,
    rate: np.ndarray,
    t0: np.ndarray,
    lat: np.ndarray,
    now: float,
    t_release: float,
    dirty: bool,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, int, int, bool]:
    """Drain the flows ``act`` (indices into the pool's arrays) from ``now`` until the next
    release (``t_release``) or until a drained flow's arrival could start new traffic;
    see :class:`moesim.sim.fabric.Fabric`. ``left`` and ``rate`` are updated in place (a
    flow of ``weight`` w stands for w flows: ``left`` and ``rate`` are their sums);
    ``t0``: when each flow's op released its first flow (the clock ``rel_tol`` is relative
    to).

    Returns (clock, flows still draining, drained flows, their drain times, events,
    rate recomputations, whether rates need recomputing)."""
    out_idx = np.empty(act.size, dtype=np.int64)
    out_t = np.empty(act.size)
    n_out = 0
    events = 0
    updates = 0
    bound = np.inf  # the earliest arrival of a drained flow: the engine may answer then
    while act.size:
        if dirty:
            r = maxmin_kernel(ptr, links, weight, capacity, rel_tol, act)
            for i in range(act.size):
                rate[act[i]] = r[i] * weight[act[i]]  # a weighted flow: its members' sum
            updates += 1
            dirty = False
        first = np.inf
        ref = now
        for i in range(act.size):
            f = act[i]
            t = now + left[f] / rate[f]
            if t < first:
                first = t
                ref = t0[f]  # when the first to drain's op started releasing
        if first > t_release or first >= bound:
            break
        limit = max(first, min(first + rel_tol * (first - ref), t_release, bound))
        cut = limit * (1 + _TIE) + 1e-300
        t_end = first
        for i in range(act.size):
            f = act[i]
            t = now + left[f] / rate[f]
            if t <= cut and t > t_end:
                t_end = t
        kept = 0
        for i in range(act.size):
            f = act[i]
            t = now + left[f] / rate[f]
            if t <= cut:
                out_idx[n_out] = f
                out_t[n_out] = t
                n_out += 1
                if t + lat[f] < bound:
                    bound = t + lat[f]
            else:
                left[f] -= rate[f] * (t_end - now)
                act[kept] = f
                kept += 1
        act = act[:kept].copy()
        now = t_end
        events += 1
        dirty = True
    return now, act, out_idx[:n_out].copy(), out_t[:n_out].copy(), events, updates, dirty
