"""Per-device SimPy formulation of the engine, kept as the oracle for its op-level one."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import simpy

from moesim.sim.engine import Exchange, Op, Records


def _everyone(op: Exchange, d: int) -> bool:
    """True when every device needs every other device to be ready."""
    s = op.senders
    if s is None:
        return True
    return bool(s.shape == (d, d) and (s | np.eye(d, dtype=bool)).all())


def reference_run_program(program: Sequence[Op], num_devices: int) -> Records:
    """One SimPy process per device (and stream): the direct formulation of the engine's
    semantics, against which the op-level engine is checked."""
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
        assert senders is not None
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
