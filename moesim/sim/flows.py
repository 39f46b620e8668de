"""The flow tier: every transfer is a flow on its path; links are shared max-min fairly.

All flows of an exchange start together. Rates are the max-min fair allocation
(progressive filling: raise every unfrozen flow's rate equally until a link saturates,
freeze the flows crossing it, repeat), recomputed each time flows finish, until all
have delivered their bytes. Flows with identical paths and sizes behave identically, so
they are merged into one weighted flow first.

Units: bytes, GB/s (= 1e3 bytes/µs), µs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from moesim.topology.build import Routes

__all__ = ["FlowResult", "maxmin_rates", "simulate_flows"]

_REL_TIE = 1e-9  # flows finishing within this relative time of each other finish together


def maxmin_rates(
    incidence: sp.csr_matrix,
    weight: np.ndarray,
    capacity: np.ndarray,
    active: np.ndarray,
    incidence_t: sp.csr_matrix | None = None,
) -> np.ndarray:
    """Max-min fair rate of each flow (GB/s), 0 for inactive flows.

    Args:
        incidence: (links, flows) 0/1 matrix; weight: (flows,) how many identical flows
        each column stands for; capacity: (links,) GB/s; active: (flows,) bool;
        incidence_t: ``incidence.T`` as CSR, when the caller already has it.
    """
    n_links, n_flows = incidence.shape
    rate = np.zeros(n_flows)
    unfrozen = active.copy()
    remaining = capacity.astype(np.float64).copy()
    if incidence_t is None:
        incidence_t = incidence.T.tocsr()
    level = 0.0
    while unfrozen.any():
        load = incidence @ (weight * unfrozen)  # (links,) unfrozen flows per link
        used = load > 0
        share = np.full(n_links, np.inf)
        share[used] = remaining[used] / load[used]
        inc = float(share.min())
        level += inc
        remaining[used] -= inc * load[used]
        saturated = used & (share <= inc * (1 + 1e-9) + 1e-300)
        hit = (incidence_t @ saturated.astype(np.float64)) > 0  # flows on a saturated link
        newly = unfrozen & hit
        rate[newly] = level
        unfrozen &= ~hit
    return rate


@dataclass(frozen=True)
class FlowResult:
    """Per flow: time its last byte arrives (µs after the exchange starts, latency included)."""

    finish_us: np.ndarray
    events: int


def simulate_flows(
    routes: Routes, nbytes: np.ndarray, capacity_gbps: np.ndarray, latency_us: np.ndarray
) -> FlowResult:
    """Run one exchange of ``routes.num_flows`` flows of ``nbytes`` each to completion.

    Each flow finishes when its bytes have drained at its (changing) max-min rate, plus
    the sum of its links' latencies.
    """
    f = routes.num_flows
    nbytes = np.asarray(nbytes, dtype=np.float64)
    lat = (
        np.add.reduceat(latency_us[routes.links], routes.indptr[:-1])
        if routes.links.size
        else np.zeros(f)
    )
    lat = np.where(np.diff(routes.indptr) > 0, lat, 0.0)
    finish = np.zeros(f)
    live = np.flatnonzero(nbytes > 0)
    if live.size == 0:
        return FlowResult(finish_us=finish, events=0)
    # merge flows with the same path and size into weighted columns
    lens = np.diff(routes.indptr)[live]
    width = int(lens.max())
    padded = np.full((live.size, width + 1), -1, dtype=np.int64)
    rows = np.repeat(np.arange(live.size), lens)
    cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    padded[rows, cols] = routes.links[_gather_index(routes.indptr, live)]
    padded[:, width] = nbytes[live].view(np.int64)
    uniq, group = np.unique(padded, axis=0, return_inverse=True)
    group = group.reshape(-1)
    g = uniq.shape[0]
    weight = np.bincount(group, minlength=g).astype(np.float64)
    size = uniq[:, width].copy().view(np.float64)
    paths = uniq[:, :width]
    valid = paths >= 0
    incidence = sp.csr_matrix(
        (np.ones(int(valid.sum())), (paths[valid], np.repeat(np.arange(g), valid.sum(axis=1)))),
        shape=(capacity_gbps.size, g),
    )
    incidence_t = incidence.T.tocsr()  # once per exchange, not once per event
    cap = capacity_gbps * 1e3  # bytes/µs
    remaining = size.copy()
    active = np.ones(g, dtype=bool)
    done_at = np.zeros(g)
    now = 0.0
    events = 0
    while active.any():
        rate = maxmin_rates(incidence, weight, cap, active, incidence_t)
        ttf = np.full(g, np.inf)  # time to finish at the current rates
        ttf[active] = remaining[active] / rate[active]
        dt = float(ttf.min())
        now += dt
        finished = active & (ttf <= dt * (1 + _REL_TIE))  # ties finish together
        remaining[active] -= rate[active] * dt
        remaining[finished] = 0.0
        done_at[finished] = now
        active &= ~finished
        events += 1
    finish[live] = done_at[group] + lat[live]
    return FlowResult(finish_us=finish, events=events)


def _gather_index(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices into the CSR ``links`` array of the given rows, concatenated in order."""
    lens = indptr[rows + 1] - indptr[rows]
    starts = np.repeat(indptr[rows], lens)
    offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return starts + offs
