"""The fabric: a cluster's links and every transfer in flight on them, on one clock.

The flow tier's network state inside the engine's event loop
(:func:`moesim.sim.engine.run_program`). Links are the topology's directed links
(:class:`moesim.topology.build.Topology`); a transfer is a :class:`Flow` batch entry on
its topology path. All flows in flight share the links max-min fairly, whichever
exchange, microbatch or collective they belong to.

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

``rel_tol`` trades exactness for speed, always on the slow side, as
:mod:`moesim.sim.flows` describes for one exchange: flows due to drain within
``rel_tol × (t − t_ref)`` of the first to drain (``t_ref``: the earliest release among
the flows draining; for one exchange released at once, its start) drain in one event,
each at its own time, the others keeping their old rates until the last of them; a
release that arrives for a time the clock has passed (its sender's ready time was inside
such a group) starts at the clock. ``rel_tol = 0`` is exact (ties within 1e-9 relative
still count as ties). Units: bytes, GB/s (= 1e3 bytes/µs), µs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from moesim.sim.flows import _TIE, _sub_paths
from moesim.topology.build import Topology

__all__ = ["Delivered", "Fabric"]


@dataclass(frozen=True)
class Delivered:
    """Flows that arrived at one event: (n,) arrays of their op, endpoints and arrival time."""

    op: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    time_us: np.ndarray


@dataclass
class _Draining:
    """The draining flows, as parallel arrays (CSR paths)."""

    ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    links: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    left: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bytes still to send
    rate: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bytes/µs
    op: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dst: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lat: np.ndarray = field(default_factory=lambda: np.zeros(0))  # µs after the last byte
    t0: np.ndarray = field(default_factory=lambda: np.zeros(0))  # release time

    @property
    def size(self) -> int:
        return int(self.left.size)

    def keep(self, mask: np.ndarray) -> None:
        rows = np.flatnonzero(mask)
        self.ptr, self.links = _sub_paths(self.ptr, self.links, rows)
        for name in ("left", "rate", "op", "src", "dst", "lat", "t0"):
            setattr(self, name, getattr(self, name)[rows])


class Fabric:
    """Links (capacity, latency) and the flows in flight on them; see the module docstring.

    ``events``: the clock's advances (each a release, a drain or an arrival, or several at
    one time); ``rate_updates``: max-min rate recomputations.
    """

    def __init__(self, topology: Topology, *, rel_tol: float = 0.0) -> None:
        self.topology = topology
        self.capacity = np.asarray(topology.capacity_gbps, dtype=np.float64) * 1e3  # bytes/µs
        self.latency_us = np.asarray(topology.latency_us, dtype=np.float64)
        self.rel_tol = float(rel_tol)
        self.now = 0.0
        self.events = 0
        self.rate_updates = 0
        self._pending: list[tuple[float, int, tuple[np.ndarray, ...]]] = []
        self._seq = 0
        self._draining = _Draining()
        self._dirty = False
        self._out: list[Delivered] = []  # drained at this event

    # ----- what the engine calls ------------------------------------------------------------
    def release(
        self,
        time_us: float,
        op: int,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        extra_latency_us: float = 0.0,
    ) -> None:
        """Queue flows ``src[f] → dst[f]`` of ``nbytes[f]`` (> 0, distinct endpoints) of op
        ``op``, to start draining at ``time_us`` (the clock, if that has passed)."""
        if not src.size:
            return
        batch = (
            np.full(src.size, op, dtype=np.int64),
            np.asarray(src, dtype=np.int64),
            np.asarray(dst, dtype=np.int64),
            np.asarray(nbytes, dtype=np.float64),
            np.full(src.size, float(extra_latency_us)),
        )
        heapq.heappush(self._pending, (max(float(time_us), self.now), self._seq, batch))
        self._seq += 1

    @property
    def busy(self) -> bool:
        """Whether anything is pending or draining."""
        return bool(self._pending or self._draining.size)

    def step(self) -> Delivered | None:
        """Advance the clock to the next event (a release or a drain) and return the flows
        that drained then, with their arrival times (possibly none); None when idle."""
        if not self.busy:
            return None
        dr = self._draining
        if self._dirty:
            self._recompute()
        t_rel = self._pending[0][0] if self._pending else np.inf
        if dr.size:
            ttf = dr.left / dr.rate
            first = self.now + float(ttf.min())
        else:
            ttf, first = np.zeros(0), np.inf
        t = min(t_rel, first)
        self.events += 1
        if dr.size:
            if first <= t_rel:  # a drain: group the drains due about then
                ref = float(dr.t0.min())
                limit = max(first, min(first + self.rel_tol * (first - ref), t_rel))
                done = self.now + ttf <= limit * (1 + _TIE) + 1e-300
                t = float((self.now + ttf[done]).max())
                self._drain(done, self.now + ttf[done])
                dr.left -= dr.rate * (t - self.now)
            else:
                dr.left -= dr.rate * (t - self.now)
                # flows whose last byte leaves at t too (a tie with the release)
                done = dr.left <= _TIE * np.maximum(dr.rate * (t - dr.t0), 1.0)
                if done.any():
                    self._drain(done, np.full(int(done.sum()), t))
        self.now = t
        while self._pending and self._pending[0][0] <= self.now:
            self._add(heapq.heappop(self._pending)[2])
        out, self._out = self._out, []
        if not out:
            return Delivered(*(np.zeros(0, dtype=np.int64) for _ in range(3)), np.zeros(0))
        if len(out) == 1:
            return out[0]
        return Delivered(
            *(np.concatenate([getattr(o, k) for o in out]) for k in ("op", "src", "dst", "time_us"))
        )

    # ----- internals ------------------------------------------------------------------------
    def _recompute(self) -> None:
        from moesim.sim._compiled import maxmin_kernel

        dr = self._draining
        if dr.size:
            dr.rate = maxmin_kernel(
                dr.ptr,
                dr.links,
                np.ones(dr.size),
                self.capacity,
                self.rel_tol,
                np.arange(dr.size, dtype=np.int64),
            )
            self.rate_updates += 1
        self._dirty = False

    def _drain(self, done: np.ndarray, at: np.ndarray) -> None:
        """Deliver the ``done`` draining flows, whose last byte left at ``at``."""
        dr = self._draining
        self._out.append(Delivered(dr.op[done], dr.src[done], dr.dst[done], at + dr.lat[done]))
        dr.keep(~done)
        self._dirty = True

    def _add(self, batch: tuple[np.ndarray, ...]) -> None:
        op, src, dst, nbytes, extra = batch
        routes = self.topology.routes(src, dst)
        hops = routes.hops()
        lat = extra.copy()
        if routes.links.size:
            has = hops > 0
            lat[has] += np.add.reduceat(self.latency_us[routes.links], routes.indptr[:-1][has])
        dr = self._draining
        dr.ptr = np.concatenate((dr.ptr, routes.indptr[1:] + dr.ptr[-1]))
        dr.links = np.concatenate((dr.links, routes.links))
        dr.left = np.concatenate((dr.left, nbytes))
        dr.rate = np.concatenate((dr.rate, np.zeros(src.size)))
        dr.op = np.concatenate((dr.op, op))
        dr.src = np.concatenate((dr.src, src))
        dr.dst = np.concatenate((dr.dst, dst))
        dr.lat = np.concatenate((dr.lat, lat))
        dr.t0 = np.concatenate((dr.t0, np.full(src.size, self.now)))
        self._dirty = True
