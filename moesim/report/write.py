"""Write a simulation's outputs: metrics.parquet, phases.parquet, layers.parquet, summary.json,
timeline.json, summary.md and report.html."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.fileio import write_output_folder
from moesim.report.page import render_markdown, render_page
from moesim.report.run import RunData, run_sections
from moesim.report.timeline import timeline_json
from moesim.sim.engine import Exchange
from moesim.sim.simulate import SimResult

__all__ = [
    "metrics_frame",
    "phases_frame",
    "render_html",
    "render_run",
    "run_files",
    "write_outputs",
    "write_run_report",
]


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


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def render_run(run: RunData) -> tuple[str, str]:
    """report.html and summary.md of one simulation."""
    sections = run_sections(run)
    title = f"moesim report: {run.info['name']}"
    source = str(run.info["source"])
    return (
        render_page(title, run.info["header"], sections, source),
        render_markdown(title, run.info["header"], sections, source),
    )


def render_html(result: SimResult) -> str:
    return render_run(RunData.from_result(result))[0]


def run_files(result: SimResult) -> dict[str, bytes]:
    """Every file of a simulation's output folder, rendered in memory."""
    run = RunData.from_result(result)
    html, md = render_run(run)
    return {
        "metrics.parquet": _parquet_bytes(run.metrics),
        "phases.parquet": _parquet_bytes(run.phases),
        "layers.parquet": _parquet_bytes(run.layers),
        "summary.json": run.summary_json().encode(),
        "timeline.json": timeline_json(result).encode(),
        "summary.md": md.encode(),
        "report.html": html.encode(),
    }


def write_outputs(
    result: SimResult,
    out_dir: str | Path,
    *,
    force: bool = False,
    extra: dict[str, bytes] | None = None,
) -> dict[str, Path]:
    """Render everything in memory first, then write the folder whole
    (:func:`~moesim.fileio.write_output_folder`; ``force``: into a folder holding other
    files, replacing only these). ``extra`` adds files (``contiguous/...`` for the demo)."""
    files = write_output_folder(out_dir, "run", run_files(result) | (extra or {}), force=force)
    return {name: path for name, path in files.items() if "/" not in name}


def write_run_report(
    folder: str | Path, out_dir: str | Path, *, force: bool = False
) -> dict[str, Path]:
    """report.html and summary.md of a simulate output folder, written to ``out_dir`` (the
    output folder itself, or a folder of their own, written whole)."""
    html, md = render_run(RunData.load(Path(folder)))
    payload = {"report.html": html.encode(), "summary.md": md.encode()}
    return write_output_folder(out_dir, "report", payload, force=force)
