"""Chrome trace event format timeline (open in Perfetto or chrome://tracing).

One process per device; thread 0 is compute, thread 1 sending and thread 2 receiving
(each transfer appears on both, with the bytes that device sends or receives; the wait
before a transfer is on the receive track). In the flow tier the two tracks show what
happened on each side: the device's own transfers from their release to the last one's
arrival, and what it receives from the first incoming release to the last arrival.
``ts`` and ``dur`` are in microseconds. An instant event marks each MoE layer's straggler
(see :mod:`moesim.sim.stragglers`) at the end of its op that added the most time to the
layer's critical path.
Several modes are laid out one after another on the same device tracks.
"""

from __future__ import annotations

import json
from typing import Any

from moesim.sim.engine import Exchange
from moesim.sim.simulate import SimResult

__all__ = ["timeline_events", "timeline_json"]

COMPUTE_TID, SEND_TID, RECV_TID = 0, 1, 2
GAP_US = 100.0


def timeline_events(result: SimResult) -> list[dict[str, Any]]:
    """The trace events of every mode and step, in a stable order."""
    d = result.runs[0].records[0].start_us.shape[1]
    dpn = result.scenario.cluster.devices_per_node
    events: list[dict[str, Any]] = []
    for dev in range(d):
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": dev,
                "tid": 0,
                "args": {"name": f"device {dev} (node {dev // dpn})"},
            }
        )
        events.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": dev,
                "tid": 0,
                "args": {"sort_index": dev},
            }
        )
        for tid, tname in ((COMPUTE_TID, "compute"), (SEND_TID, "send"), (RECV_TID, "receive")):
            events.append(
                {"name": "thread_name", "ph": "M", "pid": dev, "tid": tid, "args": {"name": tname}}
            )
    offset = 0.0
    for run in result.runs:
        for step, rec in enumerate(run.records):
            for dev in range(d):
                events.append(
                    {
                        "name": f"{run.mode} step {step}",
                        "ph": "i",
                        "s": "p",
                        "ts": round(offset, 3),
                        "pid": dev,
                        "tid": COMPUTE_TID,
                    }
                )
            for i, op in enumerate(run.program):
                comm = isinstance(op, Exchange)
                spans = (
                    rec.transfer_us if isinstance(op, Exchange) and op.flows is not None else None
                )
                for dev in range(d):
                    start = offset + float(rec.start_us[i, dev])
                    wait = float(rec.wait_us[i, dev])
                    dur = float(rec.duration_us[i, dev])
                    args = {"mode": run.mode, "step": step, "pass": op.pass_, "layer": op.layer}
                    if spans is not None and isinstance(op, Exchange):  # each side as it ran
                        events += _transfer_spans(op, spans[i, dev], offset, dev, args)
                        continue
                    if wait > 0:
                        events.append(
                            _span(
                                f"wait: {op.name}",
                                "wait",
                                start - wait,
                                wait,
                                dev,
                                RECV_TID if comm else COMPUTE_TID,
                                args,
                            )
                        )
                    if dur <= 0:
                        continue
                    if isinstance(op, Exchange):
                        sent = float(op.sent_bytes[dev]) if op.sent_bytes.size else 0.0
                        recv = float(op.recv_bytes[dev]) if op.recv_bytes.size else 0.0
                        events.append(
                            _span(
                                op.name,
                                op.category,
                                start,
                                dur,
                                dev,
                                SEND_TID,
                                args | {"sent_bytes": sent},
                            )
                        )
                        events.append(
                            _span(
                                op.name,
                                op.category,
                                start,
                                dur,
                                dev,
                                RECV_TID,
                                args | {"recv_bytes": recv},
                            )
                        )
                    else:
                        events.append(
                            _span(op.name, op.category, start, dur, dev, COMPUTE_TID, args)
                        )
            events += _straggler_marks(run, step, rec, offset)
            offset += float(rec.end_us.max()) + GAP_US
    return events


def _transfer_spans(
    op: Exchange, span: Any, offset: float, dev: int, args: dict[str, Any]
) -> list[dict[str, Any]]:
    """A flow-tier transfer on the send track from its release to its last flow's arrival,
    and on the receive track from the first incoming release to the last arrival."""
    out = []
    tracks = ((SEND_TID, "sent_bytes", op.sent_bytes), (RECV_TID, "recv_bytes", op.recv_bytes))
    for (tid, key, nbytes), (t0, t1) in zip(tracks, (span[:2], span[2:]), strict=True):
        if t1 > t0:  # NaN (nothing that way) compares false
            size = float(nbytes[dev]) if nbytes.size else 0.0
            out.append(
                _span(op.name, op.category, offset + t0, t1 - t0, dev, tid, args | {key: size})
            )
    return out


def _straggler_marks(run: Any, step: int, rec: Any, offset: float) -> list[dict[str, Any]]:
    """One instant event per MoE layer of ``step``: on the straggler's track, at the end of
    its op that added the most time to the layer's critical path."""
    index = {op.name: i for i, op in enumerate(run.program)}
    lay = run.layers[run.layers["step"] == step].sort_values("layer")
    out = []
    for r in lay.to_dict("records"):
        i = index.get(str(r["straggler_op"]))
        if i is None:
            continue
        dev = int(r["straggler_device"])
        tid = COMPUTE_TID if not isinstance(run.program[i], Exchange) else SEND_TID
        out.append(
            {
                "name": f"straggler of layer {int(r['layer'])}: {r['straggler_cause']}",
                "ph": "i",
                "s": "t",
                "ts": round(offset + float(rec.end_us[i, dev]), 3),
                "pid": dev,
                "tid": tid,
                "args": {
                    "mode": run.mode,
                    "step": step,
                    "layer": int(r["layer"]),
                    "op": str(r["straggler_op"]),
                    "time_added_us": round(float(r["straggler_excess_us"]), 3),
                },
            }
        )
    return out


def _span(
    name: str, cat: str, ts: float, dur: float, pid: int, tid: int, args: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "cat": cat,
        "ph": "X",
        "ts": round(ts, 3),
        "dur": round(dur, 3),
        "pid": pid,
        "tid": tid,
        "args": args,
    }


def timeline_json(result: SimResult) -> str:
    return json.dumps(
        {
            "traceEvents": timeline_events(result),
            "displayTimeUnit": "ms",
            "otherData": {"generator": "moesim", "scenario": result.scenario.name},
        },
        separators=(",", ":"),
    )
