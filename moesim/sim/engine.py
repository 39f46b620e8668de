"""The discrete-event engine: SimPy processes running a program of ops on every device.

A *program* is the same list of ops for every device, each op carrying per-device
durations:

* :class:`Compute` — the device is busy for ``duration_us[d]``.
* :class:`Exchange` — a collective transfer (all-to-all dispatch/combine, all-reduce).
  Device ``d`` announces it is ready to send, waits until every device it receives
  from (``senders[:, d]``) is ready too, then transfers for ``duration_us[d]``. The
  time spent waiting is the device's *wait time* at that dependency.

By default a device runs its ops one after another. When any op names its dependencies
(``after``: indices of earlier ops of the same device), each device instead runs two
streams, compute and communication, each taking its ops in program order, and an op
starts once its dependencies are done — so one microbatch's transfer can overlap another
microbatch's compute (DeepSeek-style two-microbatch overlap).

The engine only sequences events; every duration is computed beforehand by pure
functions (see :mod:`moesim.sim.program`). Events are per op, not per device and op: a
2,048-device step is as many events as a one-device step, each a few array operations.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import simpy

__all__ = ["Compute", "Exchange", "Op", "Records", "run_program"]


@dataclass(frozen=True, eq=False)
class Compute:
    """Local work on every device. ``duration_us``: (D,)."""

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

    Attributes:
        duration_us: (D,) transfer time of each device once its senders are ready.
        senders: (D, D) bool, ``senders[s, d]``: device ``d`` needs ``s`` to be ready;
            None: every device needs every other (a dense all-to-all, an all-reduce).
        sent_bytes, recv_bytes: (D,) bytes each device sends / receives.
        flow_events: rate recomputations the flow tier spent timing it (0: analytic).
        port_limited_us: (D,) each device's time were it limited by its own ports only
            (the analytic tier's time, latency included); a flow-tier ``duration_us``
            above it was slowed by another device's NIC or a shared link. None: not
            known, or the same as ``duration_us``.
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
    flow_events: int = 0
    port_limited_us: np.ndarray | None = None
    phase: str = ""  # what the op is within its layer and pass ("dispatch"); "" = the name
    microbatch: int = 0


Op = Compute | Exchange


@dataclass(frozen=True)
class Records:
    """What happened: arrays of shape (num_ops, D).

    ``start_us`` is when the op began (after any wait), ``wait_us`` the idle time
    before it, ``duration_us`` its busy time.
    """

    start_us: np.ndarray
    wait_us: np.ndarray
    duration_us: np.ndarray
    events: int

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


def run_program(program: Sequence[Op], num_devices: int) -> Records:
    """Run ``program`` on ``num_devices`` devices, each from time 0; returns the records.

    One SimPy process per stream walks that stream's ops in program order; each op is one
    event, at the time its last device finishes it. Inside an op every device's start,
    wait and end follow from pure arithmetic on arrays (D,): a compute op starts when the
    device's stream is free and its dependencies are done; an exchange starts on device
    ``d`` once ``d`` and every device it receives from are ready for it. The result is the
    same as running one process per device (tests check this against that formulation),
    at O(ops) events instead of O(ops x devices).
    """
    env = simpy.Environment()
    n, d = len(program), num_devices
    start = np.zeros((n, d))
    wait = np.zeros((n, d))
    dur = np.zeros((n, d))
    streamed = any(op.after is not None for op in program)
    done = [env.event() for _ in range(n)]
    counter = {"events": 0}

    def deps_of(i: int) -> tuple[int, ...]:
        op = program[i]
        if not streamed:
            return ()  # the stream's previous op is the previous op
        return op.after if op.after is not None else ((i - 1,) if i else ())

    def stream(ops: list[int]) -> Generator[Any, Any, None]:
        free = np.zeros(d)  # when each device's stream is done with its previous op
        for i in ops:
            op = program[i]
            deps = deps_of(i)
            if deps:
                yield env.all_of([done[j] for j in deps])
                counter["events"] += 1
                ready = np.maximum(free, np.max([start[j] + dur[j] for j in deps], axis=0))
            else:
                ready = free
            if isinstance(op, Exchange):
                if op.senders is None:
                    begin = np.maximum(ready, ready.max(initial=0.0))
                else:
                    begin = _senders_ready(ready, op.senders)
            else:
                begin = ready
            start[i] = begin
            wait[i] = begin - free
            dur[i] = op.duration_us
            free = begin + dur[i]
            last = float(free.max(initial=0.0))
            if last > env.now:
                yield env.timeout(last - env.now)
                counter["events"] += 1
            done[i].succeed()

    names = sorted({op.stream for op in program}) if streamed else [""]
    for name in names:
        env.process(
            stream([i for i, op in enumerate(program) if not streamed or op.stream == name])
        )
    env.run()
    return Records(start_us=start, wait_us=wait, duration_us=dur, events=counter["events"])
