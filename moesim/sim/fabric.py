"""The fabric: a cluster's links and every transfer in flight on them, on one clock.

The flow tier's network state inside the engine's event loop
(:func:`moesim.sim.engine.run_program`). Links are the topology's directed links
(:class:`moesim.topology.build.Topology`), plus any aggregated ports
(:mod:`moesim.sim.transfers`); a flow is one row of the fabric's pool, on its path, with
a weight (how many flows' share it takes: 1, or a bundle's member count). All flows in
flight share the links max-min fairly, whichever exchange, microbatch or collective they
belong to. A flow's lifecycle is documented on :class:`Fabric`.

``rel_tol`` trades exactness for speed, as :mod:`moesim.sim.flows` describes for one
exchange: flows due to drain within ``rel_tol × (t − t_op)`` of the first to drain
(``t_op``: when that flow's op released its first flow, the exchange's clock) drain in
one event, each at its own time, the others keeping their old rates until the last of
them; a release for a time the clock has passed (its sender's ready time fell inside
such a group) starts at the clock. The engine also rounds release times up to a grid of
``rel_tol`` × the op's median port-limited time (:meth:`moesim.sim.engine._Run._grid`).
``rel_tol = 0`` is exact (ties within 1e-9 relative still count as ties). Units: bytes,
GB/s (= 1e3 bytes/µs), µs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.sim.flows import _TIE, _sub_paths
from moesim.topology.build import Routes, Topology

__all__ = ["Delivered", "Fabric"]


@dataclass(frozen=True)
class Delivered:
    """Flows that drained at one event: (n,) arrays of their op, endpoints (labels, for
    bundles) and arrival time."""

    op: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    time_us: np.ndarray


class Fabric:
    """Links (capacity, latency) and the flows in flight on them, on one clock (``now``).

    Lifecycle of a flow (one row of the fabric's arrays):

    1. **pending** — released by the engine at its sender's ready time (:meth:`Fabric.release`),
       possibly in the future; it waits in a queue ordered by that time;
    2. **draining** — from its release time on, its bytes leave at its max-min fair rate, which
       is recomputed at every event that changes the set of draining flows (a release, a
       drain);
    3. **delivered** — its last byte has left; it arrives its path's latency later (plus any
       fixed latency it carries, such as a ring's per-step latencies). Latency holds no link,
       so the fabric hands the flow to the engine at once (:meth:`Fabric.step`), with its
       arrival time, which may lie ahead of the clock; what the engine releases in answer is
       queued for that time.

    The flows released so far live in a pool of parallel arrays (CSR paths, bytes left,
    rate, op, endpoints, latency, release time); ``_act`` indexes those still draining.
    The drain loop itself is compiled (:func:`moesim.sim._compiled.fabric_kernel`).

    ``events``: the clock's advances (each a release or a group of drains);
    ``rate_updates``: max-min rate recomputations.
    """

    #: the pool is compacted once drained flows outnumber those in flight 3:1 beyond this
    compact_min = 65_536

    def __init__(
        self,
        topology: Topology,
        *,
        rel_tol: float = 0.0,
        links: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """``links``: (capacity GB/s, latency µs) of every link, when flows also use links
        beyond the topology's (aggregated ports, :mod:`moesim.sim.transfers`)."""
        self.topology = topology
        cap, lat = links if links is not None else (topology.capacity_gbps, topology.latency_us)
        self.capacity = np.asarray(cap, dtype=np.float64) * 1e3  # bytes/µs
        self.latency_us = np.asarray(lat, dtype=np.float64)
        self.rel_tol = float(rel_tol)
        self.now = 0.0
        self.events = 0
        self.rate_updates = 0
        self._pending: list[tuple[float, int, tuple[Any, ...]]] = []
        self._seq = 0
        self._dirty = False
        self._ptr = np.zeros(1, dtype=np.int64)
        self._links = np.zeros(0, dtype=np.int64)
        self._cols: dict[str, np.ndarray] = {
            "left": np.zeros(0),
            "rate": np.zeros(0),
            "t0": np.zeros(0),
            "lat": np.zeros(0),
            "w": np.zeros(0),
            "op": np.zeros(0, dtype=np.int64),
            "src": np.zeros(0, dtype=np.int64),
            "dst": np.zeros(0, dtype=np.int64),
        }
        self._act = np.zeros(0, dtype=np.int64)
        self._n = 0  # flows in the pool (its arrays may be longer)
        self._op_start: dict[int, float] = {}  # when each op released its first flow

    # ----- what the engine calls ------------------------------------------------------------
    def release(
        self,
        time_us: float,
        op: int,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        extra_latency_us: float = 0.0,
        routes: Routes | None = None,
        weight: np.ndarray | None = None,
    ) -> None:
        """Queue flows ``src[f] → dst[f]`` of ``nbytes[f]`` (> 0, distinct endpoints) of op
        ``op``, to start draining at ``time_us`` (the clock, if that has passed). Without
        ``routes`` their paths are the topology's between devices ``src`` and ``dst``; with
        them ``src`` and ``dst`` are only labels handed back on delivery. ``weight``: how
        many flows' max-min share each takes (1)."""
        if not src.size:
            return
        batch = (
            np.full(src.size, op, dtype=np.int64),
            np.asarray(src, dtype=np.int64),
            np.asarray(dst, dtype=np.int64),
            np.asarray(nbytes, dtype=np.float64),
            np.full(src.size, float(extra_latency_us)),
            routes,
            np.ones(src.size) if weight is None else np.asarray(weight, dtype=np.float64),
        )
        heapq.heappush(self._pending, (max(float(time_us), self.now), self._seq, batch))
        self._seq += 1

    @property
    def busy(self) -> bool:
        """Whether anything is pending or draining."""
        return bool(self._pending or self._act.size)

    def step(self) -> Delivered | None:
        """Advance the clock to the next events (releases, drains) and return the flows
        that drained, with their arrival times (possibly none); None when idle.

        Drains follow one another inside one call until a release is due or a drained
        flow arrives (the engine may start new traffic then)."""
        if not self.busy:
            return None
        from moesim.sim._compiled import fabric_kernel

        c = self._cols
        t_rel = self._pending[0][0] if self._pending else np.inf
        now, self._act, idx, at, events, updates, self._dirty = fabric_kernel(
            self._ptr,
            self._links,
            c["w"],
            self.capacity,
            self.rel_tol,
            self._act,
            c["left"],
            c["rate"],
            c["t0"],
            c["lat"],
            self.now,
            t_rel,
            self._dirty,
        )
        self.now = float(now)
        self.events += events
        self.rate_updates += updates
        release = not idx.size
        if release:  # the next event is a release: the draining flows move up to it
            a = self._act
            c["left"][a] -= c["rate"][a] * (t_rel - self.now)
            self.now = t_rel
            self.events += 1
            tie = c["left"][a] <= _TIE * np.maximum(c["rate"][a] * (t_rel - c["t0"][a]), 1.0)
            if tie.any():  # flows whose last byte leaves with the release
                idx, at = a[tie], np.full(int(tie.sum()), t_rel)
                self._act = a[~tie]
                self._dirty = True
        # read the drained rows before the releases: adding flows may compact the pool
        got = Delivered(c["op"][idx], c["src"][idx], c["dst"][idx], at + c["lat"][idx])
        while release and self._pending and self._pending[0][0] <= self.now:
            self._add(heapq.heappop(self._pending)[2])
        return got

    # ----- internals ------------------------------------------------------------------------
    def _add(self, batch: tuple[Any, ...]) -> None:
        op, src, dst, nbytes, extra, routes, weight = batch
        self._compact()
        if routes is None:
            routes = self.topology.routes(src, dst)
        hops = routes.hops()
        lat = extra.copy()
        if routes.links.size:
            has = hops > 0
            lat[has] += np.add.reduceat(self.latency_us[routes.links], routes.indptr[:-1][has])
        start = self._op_start.setdefault(int(op[0]), self.now)  # one op per batch
        n, m, k = self._n, self._ptr[self._n], src.size
        self._reserve(n + k, m + routes.links.size)
        c = self._cols
        self._ptr[n + 1 : n + k + 1] = routes.indptr[1:] + m
        self._links[m : m + routes.links.size] = routes.links
        new = {
            "left": nbytes,
            "rate": 0.0,
            "t0": start,
            "lat": lat,
            "w": weight,
            "op": op,
            "src": src,
            "dst": dst,
        }
        for name, v in new.items():
            c[name][n : n + k] = v
        self._n = n + k
        self._act = np.concatenate((self._act, n + np.arange(k)))
        self._dirty = True

    def _reserve(self, flows: int, links: int) -> None:
        """Room in the pool for ``flows`` flows and ``links`` path entries, doubling (the
        arrays past the pool's size are never read: the kernel reads the rows ``_act``)."""
        c = self._cols
        if flows > c["left"].size:
            cap = max(flows, 2 * c["left"].size, 1024)
            for name, arr in c.items():
                grown = np.zeros(cap, dtype=arr.dtype)
                grown[: self._n] = arr[: self._n]
                c[name] = grown
            ptr = np.zeros(cap + 1, dtype=np.int64)
            ptr[: self._n + 1] = self._ptr[: self._n + 1]
            self._ptr = ptr
        if links > self._links.size:
            grown = np.zeros(max(links, 2 * self._links.size, 4096), dtype=np.int64)
            grown[: self._links.size] = self._links
            self._links = grown

    def _compact(self) -> None:
        """Drop drained flows from the pool once they are most of it."""
        if self._n < 4 * self._act.size + self.compact_min:
            return
        rows = np.sort(self._act)
        ptr, links = _sub_paths(self._ptr, self._links, rows)
        c = self._cols
        for name in c:
            c[name] = c[name][rows]
        self._ptr, self._links = ptr, links
        self._n = rows.size
        self._act = np.arange(rows.size)
