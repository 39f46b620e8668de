"""CLI command: ``moesim report`` writes the report of a sweep or a simulate output folder.

Registered in :mod:`moesim.cli`; the report writers are imported when the command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from moesim.console import print_json
from moesim.errors import InputError

__all__ = ["report_cmd"]


def report_cmd(
    results_dir: Annotated[
        Path, typer.Argument(help="A sweep results folder or a simulate output folder.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder for report.html and summary.md.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write into an existing folder that is not a moesim output: only "
            "report.html and summary.md there are replaced, every other file is left.",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print what the report shows as JSON: a sweep's rows (results.parquet's "
            "column names) or a run's summary (summary.json's), and the files written.",
        ),
    ] = False,
) -> None:
    """Write report.html (self-contained, inline SVG) and summary.md for a sweep results
    folder (results.parquet) or a simulate output folder (summary.json, metrics.parquet).

    With --json, prints {"results": [one row per case], "outputs": {...}} for a sweep, or
    {"info": {...}, "runs": [one summary per mode], "outputs": {...}} for a run.
    """
    from moesim.fileio import check_output_folder
    from moesim.report.sweep import write_sweep_report
    from moesim.report.write import write_run_report

    if not results_dir.is_dir():
        raise InputError("folder not found", field="RESULTS_DIR", value=str(results_dir))
    check_output_folder(out, "report", force=force)
    if (results_dir / "results.parquet").is_file():
        files = write_sweep_report(results_dir, out, force=force)
    elif (results_dir / "summary.json").is_file() or (results_dir / "metrics.parquet").is_file():
        files = write_run_report(results_dir, out, force=force)
    else:
        raise InputError(
            "neither a sweep results folder (results.parquet) nor a simulate output folder "
            "(summary.json)",
            field="RESULTS_DIR",
            value=str(results_dir),
        )
    if as_json:
        outputs = {k: str(v) for k, v in files.items()}
        print_json(_report_json(results_dir) | {"outputs": outputs})
        return
    sys.stdout.write(f"wrote {', '.join(str(p) for p in files.values())}\n")


def _report_json(results_dir: Path) -> dict[str, Any]:
    """A sweep's rows as ``moesim sweep --json`` prints them (by case index, NaN as null),
    or a run's summary.json."""
    if (results_dir / "results.parquet").is_file():
        import pyarrow.parquet as pq

        rows = sorted(
            pq.read_table(results_dir / "results.parquet").to_pylist(),
            key=lambda r: r["case_index"],
        )
        return {"results": [{k: None if v != v else v for k, v in r.items()} for r in rows]}
    data: dict[str, Any] = json.loads((results_dir / "summary.json").read_text())
    return {"info": data["info"], "runs": data["runs"]}
