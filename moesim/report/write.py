"""Write a simulation's outputs: metrics.parquet, phases.parquet, layers.parquet, summary.json,
timeline.json, summary.md and report.html."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.fileio import write_output_folder
from moesim.report.page import render_markdown, render_page
from moesim.report.run import RunData, run_sections
from moesim.report.timeline import timeline_json
from moesim.sim.simulate import SimResult

__all__ = [
    "render_html",
    "render_run",
    "run_files",
    "write_outputs",
    "write_run_report",
]


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
