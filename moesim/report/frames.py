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
        prog = run.program
        n = len(prog)
        # per op, repeated over its devices below (one row per op and device, op-major)
        passes = np.array([op.pass_ for op in prog], dtype=object)
        layers = np.array([op.layer for op in prog], dtype=np.int64)
        microbatches = np.array([op.microbatch for op in prog], dtype=np.int64)
        streams = np.array([op.stream for op in prog], dtype=object)
        phases = np.array([op.phase or op.name for op in prog], dtype=object)
        categories = np.array([op.category for op in prog], dtype=object)
        for step, rec in enumerate(run.records):
            d = rec.start_us.shape[1]
            sent, recv = np.zeros((n, d)), np.zeros((n, d))
            for i, op in enumerate(prog):
                if isinstance(op, Exchange) and op.sent_bytes.size:
                    sent[i], recv[i] = op.sent_bytes, op.recv_bytes
            frames.append(
                pd.DataFrame(
                    {
                        "mode": run.mode,
                        "step": step,
                        "pass": np.repeat(passes, d),
                        "layer": np.repeat(layers, d),
                        "device": np.tile(np.arange(d), n),
                        "microbatch": np.repeat(microbatches, d),
                        "stream": np.repeat(streams, d),
                        "phase": np.repeat(phases, d),
                        "category": np.repeat(categories, d),
                        "start_us": rec.start_us.reshape(-1),
                        "wait_us": rec.wait_us.reshape(-1),
                        "duration_us": rec.duration_us.reshape(-1),
                        "bytes_sent": sent.reshape(-1),
                        "bytes_recv": recv.reshape(-1),
                    }
                )
            )
    keys = ["mode", "step", "pass", "layer", "device"]
    loads = metrics_frame(result)[[*keys, "device_load", "dropped"]]
    return pd.concat(frames, ignore_index=True).merge(loads, on=keys, how="left")


def metrics_frame(result: SimResult) -> pd.DataFrame:
    """All modes' metrics: one row per (mode, step, pass, layer, device)."""
    return pd.concat([r.metrics for r in result.runs], ignore_index=True)
