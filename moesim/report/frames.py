"""A simulation's per-device tables, as the outputs and the report read them:
``metrics`` (one row per mode, step, pass, layer and device) and ``phases`` (one row per
op and device)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moesim.sim.engine import Exchange
from moesim.sim.simulate import SimResult

__all__ = ["metrics_frame", "phases_frame"]


def phases_frame(result: SimResult) -> pd.DataFrame:
    """One row per (mode, step, microbatch, pass, layer, device, phase): every op of the
    engine (its phase a field of the op, nothing parsed from display names) with the
    stream it ran on, its start, wait (idle time on that stream before it) and busy time,
    for transfers the bytes sent and received, and the layer's tokens (assignments
    processed) and dropped assignments on that device."""
    frames = []
    for run in result.runs:
        for step, rec in enumerate(run.records):
            d = rec.start_us.shape[1]
            op_rows = []
            for i, op in enumerate(run.program):
                sent: np.ndarray | float = 0.0
                recv: np.ndarray | float = 0.0
                if isinstance(op, Exchange) and op.sent_bytes.size:
                    sent, recv = op.sent_bytes, op.recv_bytes
                op_rows.append(
                    pd.DataFrame(
                        {
                            "mode": run.mode,
                            "step": step,
                            "pass": op.pass_,
                            "layer": op.layer,
                            "device": np.arange(d),
                            "microbatch": op.microbatch,
                            "stream": op.stream,
                            "phase": op.phase or op.name,
                            "category": op.category,
                            "start_us": rec.start_us[i],
                            "wait_us": rec.wait_us[i],
                            "duration_us": rec.duration_us[i],
                            "bytes_sent": sent,
                            "bytes_recv": recv,
                        }
                    )
                )
            frames.append(pd.concat(op_rows, ignore_index=True))
    keys = ["mode", "step", "pass", "layer", "device"]
    loads = metrics_frame(result)[[*keys, "device_load", "dropped"]]
    return pd.concat(frames, ignore_index=True).merge(loads, on=keys, how="left")


def metrics_frame(result: SimResult) -> pd.DataFrame:
    """All modes' metrics: one row per (mode, step, pass, layer, device)."""
    return pd.concat([r.metrics for r in result.runs], ignore_index=True)
