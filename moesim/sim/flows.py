"""The flow tier: every transfer is a flow on its path; links are shared max-min fairly.

:func:`simulate_flows` times one exchange on its own, all its flows starting together
(``moesim a2a``; in a simulated step the flows of every exchange share the fabric instead,
:mod:`moesim.sim.fabric`, with the same solver and drain loop). Rates are the max-min
fair allocation (progressive filling: raise every unfrozen flow's rate equally until a
link saturates, freeze the flows crossing it, repeat), recomputed each time flows finish,
until all have delivered their bytes. Flows with identical paths and sizes behave identically, so
they are merged into one weighted flow first.

``rel_tol`` trades exactness for speed on large exchanges, always on the slow side:

* links that would saturate within ``rel_tol`` of the current fill level saturate
  together, their flows frozen at that level (a feasible allocation, each rate at most
  ``rel_tol`` below its max-min value at that step);
* flows due to finish within ``rel_tol`` (relative to the exchange's clock) of the first to
  finish end together, each at its own time, and rates are recomputed once for the group,
  so the others run at the old rates a little longer (at most ``rel_tol`` of the clock).

Every finish time is therefore at least its exact value, and ``rel_tol = 0`` is exact
(ties within 1e-9 relative still count as ties). Units: bytes, GB/s (= 1e3 bytes/µs), µs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

    from moesim.topology.build import Routes

__all__ = ["FlowResult", "KeyIndex", "maxmin_rates", "simulate_flows"]

_TIE = 1e-9  # relative: always a tie, whatever rel_tol


def maxmin_rates(
    incidence: sp.csr_matrix,
    weight: np.ndarray,
    capacity: np.ndarray,
    active: np.ndarray,
    *,
    rel_tol: float = 0.0,
) -> np.ndarray:
    """Max-min fair rate of each flow (GB/s), 0 for inactive flows.

    Args:
        incidence: (links, flows) 0/1 matrix; weight: (flows,) how many identical flows
        each column stands for; capacity: (links,) GB/s; active: (flows,) bool.
    """
    import scipy.sparse as sp

    csc = sp.csc_matrix(incidence)
    idx = np.flatnonzero(active)
    ptr, links = _sub_paths(csc.indptr, csc.indices.astype(np.int64), idx)
    rate = np.zeros(incidence.shape[1])
    rate[idx] = _maxmin(ptr, links, np.asarray(weight, np.float64)[idx], capacity, rel_tol)
    return rate


def _maxmin(
    ptr: np.ndarray, links: np.ndarray, weight: np.ndarray, capacity: np.ndarray, rel_tol: float
) -> np.ndarray:
    """Max-min rates of F flows, every one active: flow f crosses ``links[ptr[f]:ptr[f+1]]``
    (at least one link each); ``weight`` (F,) identical flows per column; (L,) capacity.

    Each round raises the level to the next saturation; links saturating within
    ``rel_tol`` of that level saturate with it. Compiled
    (:func:`moesim.sim._compiled.maxmin_kernel`); its numpy specification is in
    ``tests/test_topology_flows.py``.
    """
    from moesim.sim._compiled import maxmin_kernel

    return maxmin_kernel(
        np.ascontiguousarray(ptr, dtype=np.int64),
        np.ascontiguousarray(links, dtype=np.int64),
        np.ascontiguousarray(weight, dtype=np.float64),
        np.ascontiguousarray(capacity, dtype=np.float64),
        float(rel_tol),
        np.arange(weight.size, dtype=np.int64),
    )


@dataclass(frozen=True)
class FlowResult:
    """Per flow: ``drain_us``, when its last byte leaves at its max-min rates, and
    ``latency_us``, the sum of its links' latencies; it ends at ``finish_us``, their sum
    (µs after the exchange starts). ``events``: rate recomputations."""

    drain_us: np.ndarray
    latency_us: np.ndarray
    events: int

    @property
    def finish_us(self) -> np.ndarray:
        return self.drain_us + self.latency_us


def simulate_flows(
    routes: Routes,
    nbytes: np.ndarray,
    capacity_gbps: np.ndarray,
    latency_us: np.ndarray,
    *,
    rel_tol: float = 0.0,
) -> FlowResult:
    """Run one exchange of ``routes.num_flows`` flows of ``nbytes`` each to completion.

    Each flow finishes when its bytes have drained at its (changing) max-min rate, plus
    the sum of its links' latencies. Drain times are linear in the bytes: scaling every
    flow by c scales every ``drain_us`` by c exactly.
    """
    from moesim.sim._compiled import fabric_kernel

    f = routes.num_flows
    nbytes = np.asarray(nbytes, dtype=np.float64)
    hops = routes.hops()
    lat = np.zeros(f)
    if routes.links.size:
        has = hops > 0
        lat[has] = np.add.reduceat(latency_us[routes.links], routes.indptr[:-1][has])
    drain = np.zeros(f)
    live = np.flatnonzero((nbytes > 0) & (hops > 0))
    if live.size == 0:
        return FlowResult(drain_us=drain, latency_us=lat, events=0)
    # merge flows with the same path and size into weighted flows
    lens = hops[live]
    width = int(lens.max())
    padded = np.full((live.size, width + 1), -1, dtype=np.int64)
    rows = np.repeat(np.arange(live.size), lens)
    cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    padded[rows, cols] = routes.links[_gather_index(routes.indptr, live)]
    padded[:, width] = nbytes[live].view(np.int64)
    uniq, group = np.unique(padded, axis=0, return_inverse=True)
    group = group.reshape(-1)
    weight = np.bincount(group, minlength=uniq.shape[0]).astype(np.float64)
    size = uniq[:, width].copy().view(np.float64)
    valid = uniq[:, :width] >= 0  # paths are left-aligned: valid entries come first
    ptr = np.zeros(uniq.shape[0] + 1, dtype=np.int64)
    np.cumsum(valid.sum(axis=1), out=ptr[1:])
    links = uniq[:, :width][valid]
    cap = np.asarray(capacity_gbps, dtype=np.float64) * 1e3  # bytes/µs
    n = size.size
    # every flow released at 0 and nothing to answer its arrival: one call drains them all
    _, _, idx, at, events, _, _ = fabric_kernel(
        ptr.astype(np.int64),
        links.astype(np.int64),
        weight,
        cap,
        float(rel_tol),
        np.arange(n, dtype=np.int64),
        size * weight,  # a merged flow's bytes: its members' sum
        np.zeros(n),
        np.zeros(n),
        np.full(n, np.inf),
        0.0,
        np.inf,
        True,
    )
    done_at = np.zeros(n)
    done_at[idx] = at
    drain[live] = done_at[group]
    return FlowResult(drain_us=drain, latency_us=lat, events=events)


def _sub_paths(ptr: np.ndarray, links: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The CSR paths of the given rows, in that order."""
    lens = ptr[rows + 1] - ptr[rows]
    new_ptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lens, out=new_ptr[1:])
    return new_ptr, links[_gather_index(ptr, rows)]


def _gather_index(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices into the CSR ``links`` array of the given rows, concatenated in order."""
    lens = indptr[rows + 1] - indptr[rows]
    starts = np.repeat(indptr[rows], lens)
    offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return starts + offs


@dataclass(frozen=True)
class KeyIndex:
    """The rows of an array of keys grouped by key, for repeated lookups."""

    order: np.ndarray
    sorted_keys: np.ndarray

    @staticmethod
    def of(keys: np.ndarray) -> KeyIndex:
        order = np.argsort(keys, kind="stable")
        return KeyIndex(order, keys[order])

    def rows(self, wanted: np.ndarray) -> np.ndarray:
        """Indices of the rows whose key is in ``wanted`` (sorted, distinct), by key."""
        lo = np.searchsorted(self.sorted_keys, wanted, "left")
        n = np.searchsorted(self.sorted_keys, wanted, "right") - lo
        if not n.sum():
            return np.zeros(0, dtype=np.int64)
        offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return self.order[np.repeat(lo, n) + offs]
