"""The discrete-event engine: one SimPy process per device running a program of ops.

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
functions (see :mod:`moesim.sim.program`).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True, eq=False)
class Exchange:
    """A transfer that depends on other devices.

    Attributes:
        duration_us: (D,) transfer time of each device once its senders are ready.
        senders: (D, D) bool, ``senders[s, d]``: device ``d`` needs ``s`` to be ready.
        sent_bytes, recv_bytes: (D,) bytes each device sends / receives.
    """

    name: str
    category: str
    duration_us: np.ndarray
    senders: np.ndarray
    sent_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    recv_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    layer: int = -1
    pass_: str = "forward"
    after: tuple[int, ...] | None = None  # None: the previous op of the program
    stream: str = "comm"


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

    @property
    def end_us(self) -> np.ndarray:
        return self.start_us + self.duration_us


def _everyone(op: Exchange, d: int) -> bool:
    """True when every device needs every other device to be ready."""
    s = op.senders
    return bool(s.shape == (d, d) and (s | np.eye(d, dtype=bool)).all())


def run_program(program: Sequence[Op], num_devices: int) -> Records:
    """Run ``program`` on ``num_devices`` devices, each from time 0; returns the records."""
    env = simpy.Environment()
    n, d = len(program), num_devices
    start = np.zeros((n, d))
    wait = np.zeros((n, d))
    dur = np.zeros((n, d))
    # An exchange in which every device needs every other (a dense all-to-all, an
    # all-reduce) is one counting barrier: O(D) events instead of D^2 callbacks.
    exchanges = {i: op for i, op in enumerate(program) if isinstance(op, Exchange)}
    dense = {i for i, op in exchanges.items() if _everyone(op, d)}
    barrier = {i: env.event() for i in dense}
    arrived = dict.fromkeys(dense, 0)
    ready: dict[int, list[simpy.Event]] = {
        i: [env.event() for _ in range(d)] for i in exchanges if i not in dense
    }
    needs: dict[int, list[list[int]]] = {}
    for i in ready:
        senders = exchanges[i].senders
        needs[i] = [
            sorted(set(np.flatnonzero(senders[:, dev]).tolist()) | {dev}) for dev in range(d)
        ]
    counter = {"events": 0}

    def exchange_wait(i: int, dev: int) -> Generator[Any, Any, None]:
        """Announce that ``dev`` is ready for exchange ``i``; wait for its senders."""
        if i in dense:
            arrived[i] += 1
            if arrived[i] == d:
                barrier[i].succeed()
            yield barrier[i]
        else:
            ready[i][dev].succeed()
            yield env.all_of([ready[i][s] for s in needs[i][dev]])

    if any(op.after is not None for op in program):
        done = [[env.event() for _ in range(d)] for _ in range(n)]

        def stream(dev: int, ops: list[int]) -> Generator[Any, Any, None]:
            for i in ops:
                op = program[i]
                deps = op.after if op.after is not None else ((i - 1,) if i else ())
                arrive = env.now
                if deps:
                    yield env.all_of([done[j][dev] for j in deps])
                if isinstance(op, Exchange):
                    yield from exchange_wait(i, dev)
                    counter["events"] += 2
                wait[i, dev] = env.now - arrive
                start[i, dev] = env.now
                dur[i, dev] = float(op.duration_us[dev])
                if dur[i, dev] > 0:
                    yield env.timeout(dur[i, dev])
                    counter["events"] += 1
                done[i][dev].succeed()

        streams = sorted({op.stream for op in program})
        for dev in range(d):
            for name in streams:
                env.process(stream(dev, [i for i, op in enumerate(program) if op.stream == name]))
        env.run()
        return Records(start_us=start, wait_us=wait, duration_us=dur, events=counter["events"])

    def device(dev: int) -> Generator[Any, Any, None]:
        for i, op in enumerate(program):
            t = float(op.duration_us[dev])
            if isinstance(op, Exchange):
                arrive = env.now
                yield from exchange_wait(i, dev)
                wait[i, dev] = env.now - arrive
                counter["events"] += 2
            start[i, dev] = env.now
            dur[i, dev] = t
            if t > 0:
                yield env.timeout(t)
                counter["events"] += 1

    for dev in range(d):
        env.process(device(dev))
    env.run()
    return Records(start_us=start, wait_us=wait, duration_us=dur, events=counter["events"])
