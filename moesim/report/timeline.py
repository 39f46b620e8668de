"""Chrome trace event format timeline (open in Perfetto or chrome://tracing).

One process per device; thread 0 is compute, thread 1 communication (transfers, and
the waits before them). ``ts`` and ``dur`` are in microseconds. Several modes are laid
out one after another on the same device tracks.
"""

from __future__ import annotations

import json
from typing import Any

from moesim.sim.engine import Exchange
from moesim.sim.simulate import SimResult

__all__ = ["timeline_events", "timeline_json"]

COMPUTE_TID, COMM_TID = 0, 1
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
        for tid, tname in ((COMPUTE_TID, "compute"), (COMM_TID, "communication")):
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
                tid = COMM_TID if comm else COMPUTE_TID
                for dev in range(d):
                    start = offset + float(rec.start_us[i, dev])
                    wait = float(rec.wait_us[i, dev])
                    dur = float(rec.duration_us[i, dev])
                    args = {"mode": run.mode, "step": step, "pass": op.pass_, "layer": op.layer}
                    if wait > 0:
                        events.append(
                            {
                                "name": f"wait: {op.name}",
                                "cat": "wait",
                                "ph": "X",
                                "ts": round(start - wait, 3),
                                "dur": round(wait, 3),
                                "pid": dev,
                                "tid": tid,
                                "args": args,
                            }
                        )
                    if dur > 0:
                        if isinstance(op, Exchange):
                            args = args | {
                                "sent_bytes": float(op.sent_bytes[dev])
                                if op.sent_bytes.size
                                else 0.0
                            }
                        events.append(
                            {
                                "name": op.name,
                                "cat": op.category,
                                "ph": "X",
                                "ts": round(start, 3),
                                "dur": round(dur, 3),
                                "pid": dev,
                                "tid": tid,
                                "args": args,
                            }
                        )
            offset += float(rec.end_us.max()) + GAP_US
    return events


def timeline_json(result: SimResult) -> str:
    return json.dumps(
        {
            "traceEvents": timeline_events(result),
            "displayTimeUnit": "ms",
            "otherData": {"generator": "moesim", "scenario": result.scenario.name},
        },
        separators=(",", ":"),
    )
