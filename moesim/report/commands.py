"""CLI command: ``moesim report`` writes the report of a sweep or a simulate output folder.

Registered in :mod:`moesim.cli`; the report writers are imported when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Write report.html (self-contained, inline SVG) and summary.md for a sweep results
    folder (results.parquet) or a simulate output folder (summary.json, metrics.parquet)."""
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
    sys.stdout.write(f"wrote {', '.join(str(p) for p in files.values())}\n")
