"""Which device held a layer back, and why: a walk along the engine's critical path.

DESIGN: the **straggler** of a layer is the device on the critical path, the one whose
late finish the next layer's start waited for, with its cause. Here that is found from
the engine's records (:class:`moesim.sim.engine.Records`) in four steps:

1. *Gate.* The device that finishes the layer last (its latest op of the layer ends
   last): the next layer cannot start before it.
2. *Walk back* from that op. An op started when its device was ready (its previous op on
   the stream and its dependencies done) or, for an exchange, when the latest of the
   devices it receives from was ready, whichever came later; the walk follows whichever
   it was, jumping to the sender when the device waited for one. It stops on leaving the
   layer. Every (op, device) it passes is on the critical path.
3. *Excess.* Each step of the path is charged its time beyond the mean of the same op
   over all devices: ``duration[i, d] - mean(duration[i])``. What a device inherited from
   an earlier layer (it entered late) is not charged to this layer.
4. *Straggler and cause.* The straggler is the device on the path with the most excess;
   its cause is that of its step with the most excess (:func:`classify_cause`). A layer
   whose path has no excess is balanced: its straggler is the gate device, cause "none".

**Straggler penalty** of a phase: (max − mean) / mean of per-device phase time
(:func:`straggler_penalty`); a layer reports it for the phase of its straggler's cause.

The functions are pure (arrays in, numbers out) so each is tested against a hand-computed
answer on a program of two or three devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moesim.sim.engine import Compute, Exchange, Op, Records

__all__ = [
    "CAUSES",
    "SLOW_LINK_MARGIN",
    "LayerStraggler",
    "classify_cause",
    "critical_path",
    "layer_straggler",
    "straggler_penalty",
]

#: every cause a straggler can have
CAUSES = (
    "expert compute",
    "other compute",
    "sending",
    "receiving",
    "slow NIC or link",
    "slow device",
    "jitter",
    "none",
)

#: a flow-tier transfer more than this share above its port-limited time was slowed by
#: another device's NIC or a shared link (the flow tier's own tolerance is 1 %)
SLOW_LINK_MARGIN = 0.05
_TOL = 1e-9  # relative: time differences below this are rounding noise


@dataclass(frozen=True)
class LayerStraggler:
    """The straggler of one layer.

    Attributes:
        device: the device charged with the most excess time on the critical path.
        cause: one of :data:`CAUSES`.
        op: program index of the straggler's step with the most excess (-1: none).
        phase: the metrics category of that op (``expert``, ``dispatch``, ``combine``,
            ``other``); the layer's straggler penalty is of this phase.
        excess_us: the straggler's excess time on the critical path.
        gate_device: the device that finished the layer last.
    """

    device: int
    cause: str
    op: int
    phase: str
    excess_us: float
    gate_device: int


@dataclass(frozen=True)
class StreamLinks:
    """Per op of a program: its previous op on its stream (-1: the first), and whether
    the program names its dependencies (``after``; else each op follows the one before).
    Computed once per program and shared by every layer's walk."""

    prev: list[int]
    streamed: bool

    @classmethod
    def of(cls, program: Sequence[Op]) -> StreamLinks:
        streamed = any(op.after is not None for op in program)
        last: dict[str, int] = {}
        prev = []
        for i, op in enumerate(program):
            key = op.stream if streamed else ""
            prev.append(last.get(key, -1))
            last[key] = i
        return cls(prev, streamed)

    def deps(self, program: Sequence[Op], i: int) -> tuple[int, ...]:
        """The ops op ``i`` waits for on its own device (its stream's previous op included)."""
        prev = self.prev[i]
        if not self.streamed:
            return (prev,) if prev >= 0 else ()
        after = program[i].after
        after = after if after is not None else ((i - 1,) if i else ())
        return tuple(sorted({*after, *((prev,) if prev >= 0 else ())}))


def critical_path(
    program: Sequence[Op],
    rec: Records,
    op: int,
    device: int,
    ops: set[int],
    links: StreamLinks | None = None,
) -> list[tuple[int, int]]:
    """The (op, device) steps of the critical path ending at op ``op`` on ``device``,
    latest first, walking back while the op is in ``ops`` (step 2 of the module's walk).

    Ties go to the device's own previous op, then to the lowest sender id.
    """
    links = links or StreamLinks.of(program)
    end = rec.end_us
    path: list[tuple[int, int]] = []
    i, d = op, device
    while i in ops:
        path.append((i, d))
        deps = links.deps(program, i)
        local = max((float(end[j, d]) for j in deps), default=0.0)
        o = program[i]
        begin = float(rec.start_us[i, d])
        nxt_dev = d
        if isinstance(o, Exchange) and begin > local + _TOL * max(1.0, abs(begin)):
            # waited for a sender: the one ready last (ready = its own ops done)
            senders = (
                np.arange(end.shape[1]) if o.senders is None else np.flatnonzero(o.senders[:, d])
            )
            ready = end[list(deps)][:, senders].max(axis=0) if deps else np.zeros(senders.size)
            nxt_dev = int(senders[int(np.argmax(ready))])  # argmax: the lowest id on ties
        if not deps:
            break
        # the dependency on the chosen device that ended last (its stream's previous op
        # on ties: it comes first in ``deps`` only by index, so pick it explicitly)
        ends = [float(end[j, nxt_dev]) for j in deps]
        best = max(ends)
        cands = [j for j, e in zip(deps, ends, strict=True) if e >= best - _TOL * max(1.0, best)]
        i, d = (links.prev[i] if links.prev[i] in cands else cands[-1]), nxt_dev
    return path


def classify_cause(
    op: Op,
    device: int,
    duration_us: float,
    base_us: float,
    mean_base_us: float,
    *,
    slow_devices: Mapping[int, float],
    jitter: float,
    degraded_nics: Mapping[int, float],
) -> str:
    """Why ``device`` took long on ``op`` (one of :data:`CAUSES`).

    Args:
        duration_us: the device's time on the op, as run.
        base_us: its time before injected slowness (slow devices, jitter); equals
            ``duration_us`` for exchanges and when nothing is injected.
        mean_base_us: the mean over devices of the op's time before injected slowness.

    A compute op is charged to injected slowness when that adds more than the device's own
    work exceeds the mean (``duration - base > base - mean_base``): "slow device" when the
    device is listed in ``slow_devices``, "jitter" otherwise; else to "expert compute" or
    "other compute" by the op's category. An exchange is charged to "slow NIC or link"
    when the device's NIC is degraded, or when the op took more than
    :data:`SLOW_LINK_MARGIN` longer than the device's own ports allow
    (``op.port_limited_us``, a flow-tier transfer) and either longer than every device's
    ports allow (a slow shared link) or about as long as a degraded NIC's ports allow (its
    transfers with that device); otherwise (its own bytes, or a busy peer's) to "sending"
    or "receiving", whichever moves more bytes on it.
    """
    if isinstance(op, Compute):
        injected = duration_us - base_us
        if injected > _TOL * max(1.0, duration_us) and injected > base_us - mean_base_us:
            if slow_devices.get(device, 1.0) != 1.0:
                return "slow device"
            if jitter > 0:
                return "jitter"
        return "expert compute" if op.category == "expert" else "other compute"
    if degraded_nics.get(device, 1.0) != 1.0:
        return "slow NIC or link"
    lim = op.port_limited_us
    slow = 1 + SLOW_LINK_MARGIN
    if lim is not None and duration_us > lim[device] * slow:
        # slower than its own ports allow: a link slower than every port (oversubscription)
        # or a degraded NIC elsewhere explains it; a busy peer's healthy port does not
        if duration_us > float(lim.max()) * slow:
            return "slow NIC or link"
        degraded = [d for d, f in degraded_nics.items() if f != 1.0]
        if degraded and float(lim[degraded].max()) * slow >= duration_us:
            return "slow NIC or link"
    sent = float(op.sent_bytes[device]) if op.sent_bytes.size else 0.0
    recv = float(op.recv_bytes[device]) if op.recv_bytes.size else 0.0
    return "sending" if sent >= recv else "receiving"


def straggler_penalty(phase_us: np.ndarray) -> float:
    """(max − mean) / mean of per-device phase time ``phase_us`` (D,); 0.0 when all idle."""
    mean = float(phase_us.mean()) if phase_us.size else 0.0
    return float((phase_us.max() - mean) / mean) if mean > 0 else 0.0


def layer_straggler(
    program: Sequence[Op],
    rec: Records,
    ops: Sequence[int],
    *,
    base_us: np.ndarray | None = None,
    slow_devices: Mapping[int, float] | None = None,
    jitter: float = 0.0,
    degraded_nics: Mapping[int, float] | None = None,
    links: StreamLinks | None = None,
    mean_us: np.ndarray | None = None,
) -> LayerStraggler:
    """The straggler of the layer made of program ops ``ops`` (steps 1-4 of the module).

    Args:
        base_us: (num_ops, D) op times before injected slowness; None: ``rec.duration_us``.
        links, mean_us: the program's :class:`StreamLinks` and ``rec.duration_us.mean(1)``
            when the caller walks several layers of one step (computed here if None).
    """
    dur = rec.duration_us
    base = dur if base_us is None else base_us
    idx = np.asarray(sorted(ops))
    ends = rec.end_us[idx]  # (n, D)
    gate = int(np.argmax(ends.max(axis=0)))  # the lowest id among those finishing last
    last = int(idx[int(np.argmax(ends[:, gate]))])
    path = critical_path(program, rec, last, gate, set(int(i) for i in idx), links)
    mean = dur.mean(axis=1) if mean_us is None else mean_us
    charged: dict[int, float] = {}
    worst: dict[int, tuple[float, int]] = {}
    for i, d in path:
        x = float(dur[i, d] - mean[i])
        charged[d] = charged.get(d, 0.0) + x
        if d not in worst or x > worst[d][0]:
            worst[d] = (x, i)
    # the most charged device; on ties the one the walk met first (nearest the gate)
    order = list(dict.fromkeys(d for _, d in path))
    dev = max(order, key=lambda d: (charged[d], -order.index(d)))
    total = float(rec.end_us[last, gate]) - float(rec.start_us[idx, gate].min())
    if charged[dev] <= _TOL * max(1.0, total) or worst[dev][0] <= 0:
        return LayerStraggler(gate, "none", -1, "expert", 0.0, gate)
    x, i = worst[dev]
    op = program[i]
    cause = classify_cause(
        op,
        dev,
        float(dur[i, dev]),
        float(base[i, dev]),
        float(base[i].mean()),
        slow_devices=slow_devices or {},
        jitter=jitter,
        degraded_nics=degraded_nics or {},
    )
    return LayerStraggler(dev, cause, i, op.category, charged[dev], gate)
