"""The discrete-event engine: a program of ops run on every device, on one clock.

A *program* is the same list of ops for every device, each op carrying per-device
figures:

* :class:`Compute` — the device is busy for ``duration_us[d]``.
* :class:`Exchange` — a collective transfer (all-to-all dispatch/combine, all-reduce).
  Device ``d`` is *ready* for it when its stream and the op's dependencies are done. Its
  *begin* is when it and every device it receives from (``senders[:, d]``) are ready; the
  time in between is its *wait* at that dependency. How long it then takes depends on the
  network tier:

  - **closed form** (``flows`` None; the analytic tier): ``duration_us[d]``, computed
    beforehand from the device's ports (:mod:`moesim.sim.network`);
  - **event-driven** (``flows`` set; the flow tier): device ``d``'s transfers are released
    into the :class:`~moesim.sim.fabric.Fabric` when ``d`` is ready, not when its last peer
    is, and share every link max-min fairly with every other transfer in flight — of this
    exchange, of another microbatch's, of an all-reduce. Rates change at each release and
    each drain. The device's op ends when the last transfer it sends or receives arrives
    (at ``rail`` and ``node`` granularity, :mod:`moesim.sim.transfers`, a bundle goes out
    when its release group, its sender or its source node, is ready, and a device it
    touches is done with it when its share would have arrived). Release times go out on a
    grid of the fabric's ``rel_tol`` x the op's median port-limited time
    (:meth:`_Run._grid`).

By default a device runs its ops one after another. When any op names its dependencies
(``after``: indices of earlier ops of the same device), each device instead runs one
stream per ``stream`` name (compute, communication, gradient all-reduce), each taking its
ops in program order, and an op starts once its dependencies are done on that device —
so one microbatch's transfer can overlap another microbatch's compute (DeepSeek-style
two-microbatch overlap), and a gradient bucket's all-reduce the backward pass.

The lifecycle of an op on a device is documented on :class:`Compute` and
:class:`Exchange`, that of a flow on :class:`moesim.sim.fabric.Fabric`.

The event loop is our own, not SimPy: its state is per-op arrays over devices
(:class:`_Run`), and the fabric's flows in flight (:class:`moesim.sim.fabric.Fabric`).
Everything that interacts with nothing — compute, closed-form exchanges — is array
arithmetic over all devices at once; the clock only moves at the fabric's events
(releases, drains), after each of which the devices whose transfers arrived
advance as far as they can. A program without flow exchanges therefore takes one pass
and no clock events; with SimPy a process per device and stream (the formulation kept in
``tests/engine_reference.py`` as the oracle the tests hold this engine to) would cost a
generator resume per op and device: 2,048 devices x 58 layers are millions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from moesim.sim.fabric import Delivered, Fabric
from moesim.sim.transfers import Bundles, FlowSet

__all__ = ["Compute", "Exchange", "Op", "Records", "run_program"]


@dataclass(frozen=True, eq=False)
class Compute:
    """Local work on every device. ``duration_us``: (D,).

    Lifecycle on a device: *blocked* (its stream's previous op or a dependency not done
    there) → *started* when both are done → *done* ``duration_us[d]`` later.
    """

    name: str
    category: str
    duration_us: np.ndarray
    layer: int = -1
    pass_: str = "forward"
    after: tuple[int, ...] | None = None  # None: the previous op of the program
    stream: str = "compute"
    phase: str = ""  # what the op is within its layer and pass ("experts"); "" = the name
    microbatch: int = 0


@dataclass(frozen=True, eq=False)
class Exchange:
    """A transfer that depends on other devices.

    Lifecycle on a device: *blocked* → *ready* when its stream's previous op and its
    dependencies are done there (a flow exchange releases the device's flows into the
    fabric then; a ``barrier`` one once every device is ready) → *begun* when every device
    it receives from is ready too (the time since ready is its wait) → *done*:
    ``duration_us[d]`` after its begin (closed form), or when the last flow it sends or
    receives arrives (flow tier).

    Attributes:
        duration_us: (D,) closed-form transfer time of each device once its senders are
            ready (the analytic tier); unused, zeros, when ``flows`` is set.
        senders: (D, D) bool, ``senders[s, d]``: device ``d`` needs ``s`` to be ready;
            None: every device needs every other (a dense all-to-all, an all-reduce).
        sent_bytes, recv_bytes: (D,) bytes each device sends / receives.
        flows: the flow tier's transfers, timed in the engine's loop on the fabric.
        port_limited_us: (D,) each device's time were it limited by its own ports only
            (the analytic tier's time, latency included); a flow-tier time above it was
            slowed by another device's NIC or a shared link. None: not known, or the same
            as ``duration_us``.
    """

    name: str
    category: str
    duration_us: np.ndarray
    senders: np.ndarray | None
    sent_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    recv_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    layer: int = -1
    pass_: str = "forward"
    after: tuple[int, ...] | None = None  # None: the previous op of the program
    stream: str = "comm"
    flows: FlowSet | None = None
    port_limited_us: np.ndarray | None = None
    phase: str = ""  # what the op is within its layer and pass ("dispatch"); "" = the name
    microbatch: int = 0


Op = Compute | Exchange


@dataclass(frozen=True)
class Records:
    """What happened: arrays of shape (num_ops, D).

    ``start_us`` is when the op began (after any wait), ``wait_us`` the idle time
    before it, ``duration_us`` its busy time. ``events``: op completions processed (one
    per op and batch of devices completing it together) plus the fabric's clock events;
    ``rate_updates``: the fabric's max-min rate recomputations (0 without flow exchanges);
    ``flows``: the flows the program's flow exchanges hold (device flows and bundles);
    ``transfer_us``: for flow exchanges, (ops, D, 4) when each device's own transfers were
    released and when the last of them arrived, then the same for what it receives (NaN
    where it sends or receives nothing, and for every other op); None without flows.
    """

    start_us: np.ndarray
    wait_us: np.ndarray
    duration_us: np.ndarray
    events: int
    rate_updates: int = 0
    flows: int = 0
    transfer_us: np.ndarray | None = None

    @cached_property
    def end_us(self) -> np.ndarray:
        return self.start_us + self.duration_us


def _senders_ready(ready: np.ndarray, senders: np.ndarray) -> np.ndarray:
    """(D,) latest ``ready[s]`` over each device's senders ``senders[:, d]`` and itself.

    Devices are visited from the latest-ready down: the first sender a device has among
    them is its answer, so an all-to-all where most devices hear from the latest one costs
    O(D) per visited device rather than O(D^2).
    """
    d = ready.size
    out = ready.copy()
    left = np.arange(d)
    for s in np.argsort(-ready, kind="stable")[:8]:
        hit = senders[s, left]
        out[left[hit]] = np.maximum(out[left[hit]], ready[s])
        left = left[~hit]
        if not left.size:
            return out
    cols = senders[:, left]  # (D, |left|)
    late = np.where(cols, ready[:, None], -np.inf).max(axis=0, initial=-np.inf)
    out[left] = np.maximum(out[left], late)
    return out


class _Run:
    """One run of a program: per-op arrays over devices, and the fabric."""

    def __init__(self, program: Sequence[Op], d: int, fabric: Fabric | None) -> None:
        n = len(program)
        self.program, self.d, self.fabric = program, d, fabric
        self.start = np.zeros((n, d))
        self.wait = np.zeros((n, d))
        self.dur = np.zeros((n, d))
        self.end = np.zeros((n, d))
        self.ready = np.zeros((n, d))  # when each device was ready for the op
        self.free = np.zeros((n, d))  # when its stream was done with the previous op
        self.seen = np.zeros((n, d), dtype=bool)  # ready time known
        self.done = np.zeros((n, d), dtype=bool)
        self.events = 0
        streamed = any(op.after is not None for op in program)
        last: dict[str, int] = {}
        self.prev: list[int] = []  # the op before, on the device's same stream
        self.deps: list[tuple[int, ...]] = []
        for i, op in enumerate(program):
            key = op.stream if streamed else ""
            self.prev.append(last.get(key, -1))
            last[key] = i
            if streamed and op.after is not None:
                self.deps.append(tuple(op.after))
            else:
                self.deps.append((i - 1,) if i else ())
        self.streams = sorted(set(last))
        self.stream_of = [op.stream if streamed else "" for op in program]
        # flow exchanges, per device: flows touching it not yet arrived, its latest
        # arrival and the latest release among the flows it receives; bundles released
        self.left: dict[int, np.ndarray] = {}
        self.last_arrival: dict[int, np.ndarray] = {}
        self.last_in: dict[int, np.ndarray] = {}
        self.spans: dict[int, np.ndarray] = {}
        self.bundles_out: dict[int, np.ndarray] = {}  # release groups whose bundles are out
        self.bundle_start: dict[int, np.ndarray] = {}
        for i, op in enumerate(program):
            if isinstance(op, Exchange) and op.flows is not None:
                if fabric is None:
                    raise ValueError(f"op {op.name!r} has flows: run_program needs a fabric")
                fs = op.flows
                left = np.bincount(fs.src, minlength=d) + np.bincount(fs.dst, minlength=d)
                if fs.bundles is not None:
                    left += np.bincount(fs.bundles.touch_dev, minlength=d)
                    self.bundles_out[i] = np.zeros(-(-d // fs.bundles.group_size), dtype=bool)
                    self.bundle_start[i] = np.zeros(fs.bundles.nbytes.size)
                self.left[i] = left
                self.last_arrival[i] = np.full(d, -np.inf)
                self.last_in[i] = np.full(d, -np.inf)
                # per device: first release and last arrival of what it sends, and of
                # what it receives (the timeline's send and receive spans)
                self.spans[i] = np.array([[np.inf], [-np.inf], [np.inf], [-np.inf]]).repeat(d, 1)
        self.lo = 0  # every op before lo is done on every device

    # ----- advancing the devices ------------------------------------------------------------
    def advance(self) -> None:
        """Take every device as far as known times allow: each op whose inputs are done on
        some device gets its ready time there; ops that end in closed form end."""
        n = len(self.program)
        while self.lo < n and self.done[self.lo].all():
            self.lo += 1
        blocked: set[str] = set()
        for i in range(self.lo, n):
            s = self.stream_of[i]
            if s in blocked:
                continue
            if not self.done[i].all():
                self._visit(i)
                if not self.done[i].any():
                    blocked.add(s)
                    if len(blocked) == len(self.streams):
                        return

    def _visit(self, i: int) -> None:
        op = self.program[i]
        new = ~self.seen[i]
        prev = self.prev[i]
        for j in {*self.deps[i], *((prev,) if prev >= 0 else ())}:
            new &= self.done[j]
        if new.any():
            idx: np.ndarray | slice = slice(None) if new.all() else np.flatnonzero(new)
            free = self.end[prev, idx] if prev >= 0 else np.zeros(self.d)[idx]
            ready = free
            for j in self.deps[i]:
                ready = np.maximum(ready, self.end[j, idx])
            self.ready[i, idx] = ready
            self.free[i, idx] = free
            self.seen[i, idx] = True
            if isinstance(op, Compute):
                self._finish(i, idx, ready, op.duration_us[idx])
                return
            if op.flows is not None:
                self._release(i, op.flows, idx, ready)
        if isinstance(op, Exchange) and op.flows is None:
            self._closed_form(i, op)

    def _finish(self, i: int, idx: np.ndarray | slice, begin: np.ndarray, dur: np.ndarray) -> None:
        self.start[i, idx] = begin
        self.wait[i, idx] = begin - self.free[i, idx]
        self.dur[i, idx] = dur
        self.end[i, idx] = begin + dur
        self.done[i, idx] = True
        self.events += 1

    def _closed_form(self, i: int, op: Exchange) -> None:
        """Begin (senders ready) and end of a closed-form exchange where they are known."""
        seen, done = self.seen[i], self.done[i]
        if seen.all():
            ready = self.ready[i]
            if op.senders is None:
                begin = np.full(self.d, ready.max(initial=0.0))
            else:
                begin = _senders_ready(ready, op.senders)
            cand = np.flatnonzero(~done)
            if cand.size == self.d:
                self._finish(i, slice(None), begin, op.duration_us)
            elif cand.size:
                self._finish(i, cand, begin[cand], op.duration_us[cand])
            return
        if op.senders is None:
            return
        cand = np.flatnonzero(seen & ~done)
        if not cand.size:
            return
        cols = op.senders[:, cand]
        ok = ~(cols & ~seen[:, None]).any(axis=0)
        if not ok.any():
            return
        cand, cols = cand[ok], cols[:, ok]
        late = np.where(cols, self.ready[i][:, None], -np.inf).max(axis=0, initial=-np.inf)
        begin = np.maximum(self.ready[i, cand], late)
        self._finish(i, cand, begin, op.duration_us[cand])

    # ----- flow exchanges -------------------------------------------------------------------
    def _release(self, i: int, fs: FlowSet, idx: np.ndarray | slice, ready: np.ndarray) -> None:
        assert self.fabric is not None
        devs = np.arange(self.d)[idx]
        if fs.barrier:
            if not self.seen[i].all():
                return
            t = float(self.ready[i].max(initial=0.0))
            self._send(i, fs, np.arange(fs.src.size), np.full(fs.src.size, t))
        else:
            f = fs.of_senders(devs)
            when = np.zeros(self.d)
            when[devs] = self._grid(i, ready)
            self._send(i, fs, f, when[fs.src[f]])
            if fs.bundles is not None:
                self._send_bundles(i, fs, fs.bundles, devs)
        # devices with nothing to send or receive are done once ready
        idle = devs[self.left[i][devs] == 0]
        if idle.size:
            r = self.ready[i, idle]
            self._finish(i, idle, r, np.zeros(idle.size))

    def _grid(self, i: int, ready: np.ndarray) -> np.ndarray:
        """Release times: ``ready``, or with the fabric's ``rel_tol`` > 0 rounded up to a grid
        of ``rel_tol`` x the op's median port-limited time, so that devices ready within a
        step of it release together (one rate recomputation, not one per device)."""
        assert self.fabric is not None
        op = self.program[i]
        lim = op.port_limited_us if isinstance(op, Exchange) else None
        if self.fabric.rel_tol <= 0 or lim is None or not (lim > 0).any():
            return ready
        q = self.fabric.rel_tol * float(np.median(lim[lim > 0]))
        return np.maximum(np.ceil(ready / q) * q, ready)

    def _send(self, i: int, fs: FlowSet, f: np.ndarray, when: np.ndarray) -> None:
        assert self.fabric is not None
        if not f.size:
            return
        np.maximum.at(self.last_in[i], fs.dst[f], when)
        np.minimum.at(self.spans[i][0], fs.src[f], when)
        np.minimum.at(self.spans[i][2], fs.dst[f], when)
        for part, t in _by_time(f, when):
            self.fabric.release(
                float(t),
                i,
                fs.src[part],
                fs.dst[part],
                fs.nbytes[part] * fs.scale,
                fs.extra_latency_us,
            )

    def _send_bundles(self, i: int, fs: FlowSet, b: Bundles, devs: np.ndarray) -> None:
        """Release the bundles of the release groups that ``devs``, ready now, complete:
        at the latest release time (:meth:`_grid`) of the group's devices."""
        assert self.fabric is not None
        size = b.group_size
        cand = np.unique(devs // size)
        cand = cand[~self.bundles_out[i][cand]]
        members = np.minimum(cand[:, None] * size + np.arange(size), self.d - 1)
        whole = self.seen[i][members].all(axis=1)
        groups, members = cand[whole], members[whole]
        if not groups.size:
            return
        self.bundles_out[i][groups] = True
        t_group = np.zeros(self.bundles_out[i].size)
        t_group[groups] = self._grid(i, self.ready[i][members]).max(axis=1)
        sel = b.of_groups(groups)
        if not sel.size:
            return
        t = t_group[b.group[sel]]
        self.bundle_start[i][sel] = t
        touched, _, out = b.touched(sel)
        lens = b.touch_ptr[sel + 1] - b.touch_ptr[sel]
        t_touch = np.repeat(t, lens)
        np.maximum.at(self.last_in[i], touched, t_touch)
        np.minimum.at(self.spans[i][0], touched[out], t_touch[out])
        np.minimum.at(self.spans[i][2], touched[~out], t_touch[~out])
        for part, t0 in _by_time(sel, t):
            label = -(part + 1)  # bundles are told from device flows by negative labels
            self.fabric.release(
                float(t0),
                i,
                label,
                label,
                b.nbytes[part] * fs.scale,
                fs.extra_latency_us,
                routes=b.sub_routes(part),
                weight=b.weight[part],
            )

    def arrived(self, got: Delivered) -> bool:
        """Count the delivered flows; end the devices whose last flow of an op arrived.
        True when some device's op ended."""
        ended = False
        for i in np.unique(got.op).tolist():
            m = got.op == i
            src, dst, t = got.src[m], got.dst[m], got.time_us[m]
            fs = self.program[i].flows
            assert fs is not None
            # the devices each arrival is counted for: (device, time) sending and receiving
            bund = src < 0  # bundles carry negative labels
            out_dev, out_t, in_dev, in_t = src[~bund], t[~bund], dst[~bund], t[~bund]
            if bund.any():
                assert fs.bundles is not None
                sel = -src[bund] - 1
                lens = fs.bundles.touch_ptr[sel + 1] - fs.bundles.touch_ptr[sel]
                dev, frac, sender = fs.bundles.touched(sel)
                # a touched device is done with the bundle its share of the way through
                t0 = np.repeat(self.bundle_start[i][sel], lens)
                t_dev = t0 + frac * (np.repeat(t[bund], lens) - t0)
                out_dev, out_t = np.r_[out_dev, dev[sender]], np.r_[out_t, t_dev[sender]]
                in_dev, in_t = np.r_[in_dev, dev[~sender]], np.r_[in_t, t_dev[~sender]]
            np.maximum.at(self.spans[i][1], out_dev, out_t)
            np.maximum.at(self.spans[i][3], in_dev, in_t)
            src, dst = out_dev, in_dev
            np.subtract.at(self.left[i], src, 1)
            np.subtract.at(self.left[i], dst, 1)
            np.maximum.at(self.last_arrival[i], src, out_t)
            np.maximum.at(self.last_arrival[i], dst, in_t)
            if fs.barrier:  # a collective ends on every device with its last flow
                if self.left[i].any():
                    continue
                self.last_arrival[i][:] = self.last_arrival[i].max()
                touched = np.arange(self.d)
            else:
                touched = np.unique(np.concatenate((src, dst)))
            fin = touched[
                (self.left[i][touched] == 0) & self.seen[i, touched] & ~self.done[i, touched]
            ]
            if fin.size:
                begin = np.maximum(self.ready[i, fin], self.last_in[i][fin])
                self._finish(i, fin, begin, np.maximum(self.last_arrival[i][fin] - begin, 0.0))
                ended = True
        return ended


def _by_time(items: np.ndarray, when: np.ndarray) -> Iterator[tuple[np.ndarray, float]]:
    """``items`` in batches of one release time each, earliest first (stable within)."""
    order = np.argsort(when, kind="stable")
    items, when = items[order], when[order]
    cut = np.flatnonzero(np.diff(when)) + 1
    for part, t in zip(np.split(items, cut), when[np.r_[0, cut]], strict=True):
        yield part, float(t)


def run_program(program: Sequence[Op], num_devices: int, fabric: Fabric | None = None) -> Records:
    """Run ``program`` on ``num_devices`` devices, each from time 0; returns the records.

    ``fabric``: the links the flow exchanges' transfers share (needed when any exchange
    has ``flows``). Results equal one SimPy process per device and stream
    (``tests/engine_reference.py``) for closed-form programs, at array cost.
    """
    run = _Run(program, num_devices, fabric)
    run.advance()
    while fabric is not None and fabric.busy:
        got = fabric.step()
        if got is not None and got.op.size and run.arrived(got):
            run.advance()
    if not run.done.all():
        i = int(np.flatnonzero(~run.done.all(axis=1))[0])
        raise RuntimeError(f"the program deadlocked at op {i} ({program[i].name!r})")
    transfer_us = None
    if run.spans:  # (ops, D, 4): send from, send to, receive from, receive to; NaN: none
        transfer_us = np.full((len(program), num_devices, 4), np.nan)
        for i, sp in run.spans.items():
            transfer_us[i] = np.where(np.isfinite(sp), sp, np.nan).T
    return Records(
        transfer_us=transfer_us,
        start_us=run.start,
        wait_us=run.wait,
        duration_us=run.dur,
        events=run.events + (fabric.events if fabric is not None else 0),
        rate_updates=fabric.rate_updates if fabric is not None else 0,
        flows=sum(
            op.flows.src.size + (op.flows.bundles.nbytes.size if op.flows.bundles else 0)
            for op in program
            if isinstance(op, Exchange) and op.flows
        ),
    )
