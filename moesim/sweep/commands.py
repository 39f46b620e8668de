"""``moesim sweep``: run a sweep file's cases on a local process pool or a Dask cluster.

Registered in :mod:`moesim.cli`; the simulator and Dask are imported when the command runs.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["ExecutorChoice", "sweep_cmd"]

_TABLE_ROWS = 40


class ExecutorChoice(str, Enum):
    """Where the cases run."""

    local = "local"
    dask = "dask"


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _results_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> Any:
    from rich.table import Table

    table = Table(
        "case",
        *columns,
        "status",
        "step ms",
        "Mtokens/s",
        "drop %",
        "routed balance",
        "straggler penalty",
        title=title,
    )
    for r in rows[:_TABLE_ROWS]:
        ok = r["status"] == "ok"
        table.add_row(
            str(r["case_index"]),
            *(_fmt(r.get(c)) for c in columns),
            r["status"],
            f"{r['step_time_us'] / 1e3:.3f}" if ok else "-",
            f"{r['tokens_per_s'] / 1e6:.2f}" if ok else "-",
            f"{100 * r['drop_rate']:.3f}" if ok else "-",
            f"{r['routed_balance']:.3f}" if ok else "-",
            f"{100 * r['straggler_penalty']:.1f}%" if ok else "-",
        )
    return table


def sweep_cmd(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML file.")],
    out: Annotated[Path, typer.Option(help="Results folder (created; re-runs resume it).")],
    executor: Annotated[
        ExecutorChoice, typer.Option(help="local: a process pool; dask: a Dask cluster.")
    ] = ExecutorChoice.local,
    address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler address (tcp://host:8786); none: a LocalCluster."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes of the pool or LocalCluster (default: CPU count)."),
    ] = None,
    max_cases: Annotated[
        int, typer.Option(min=1, help="Refuse a sweep that expands to more cases.")
    ] = 10_000,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write into an existing folder that is not a sweep's: only the sweep's own "
            "files are written there, every other file is left as it is.",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print every case's row as JSON (results.parquet's column names) instead "
            "of the table.",
        ),
    ] = False,
) -> None:
    """Run every case of a sweep; append each to OUT/results.parquet as it finishes.

    A sweep is a base scenario plus axes over any scenario field (dotted paths, e.g.
    capacity.factor), as a grid or an explicit list of cases. Re-running skips the cases
    already in OUT (keyed by a hash of the case's full scenario); a failing case is recorded
    with its error and the sweep goes on. Exit status 1 when any case failed.
    """
    from contextlib import ExitStack

    from moesim.console import make_console, progress_bar
    from moesim.paths import display_path
    from moesim.sweep.api import sweep_file as run_sweep_file
    from moesim.sweep.run import SweepError

    err_console = make_console(stderr=True)
    console = make_console()
    with ExitStack() as bar:
        advance: list[Any] = []

        def on_start(message: str, total: int, done: int, failed: int) -> None:
            err_console.print(message, markup=False)
            advance.append(
                bar.enter_context(
                    progress_bar(
                        "sweep",
                        total,
                        "cases, {task.fields[failed]} failed",
                        completed=done,
                        failed=failed,
                    )
                )
            )

        try:
            done = run_sweep_file(
                sweep_file,
                out,
                executor="dask" if executor is ExecutorChoice.dask else "local",
                address=address,
                workers=workers,
                max_cases=max_cases,
                force=force,
                source=str(display_path(sweep_file)),
                on_start=on_start,
                on_result=lambda failed: advance[0](1, failed=failed),
            )
        except SweepError as err:
            bar.close()
            err_console.print(f"moesim: error: {err}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Abort() from None
    rows, run, results, errors = done.rows, done.run, done.results, done.errors
    if not advance:  # nothing ran: every case was done
        err_console.print(f"sweep {done.name!r}: all {run.total} cases already done")
    if as_json:
        # NaN (a metric a failed case lacks) is not JSON: null
        clean = [{k: None if v != v else v for k, v in r.items()} for r in rows]
        _report(out, err_console, force)
        sys.stdout.write(json.dumps({"results": clean, "out": str(results)}, indent=1) + "\n")
        if errors:
            raise typer.Exit(1)
        return
    console.print(_results_table(rows, done.columns, title=str(results)))
    if len(rows) > _TABLE_ROWS:
        console.print(f"... and {len(rows) - _TABLE_ROWS} more cases in {results}")
    for r in errors[:5]:
        console.print(f"case {r['case_index']} failed: {r['error']}", markup=False)
    console.print(
        f"{len(rows)} cases ({len(rows) - len(errors)} ok, {len(errors)} failed): {run.ran} run "
        f"now in {run.wall_s:.1f} s, {run.skipped} already done; wrote {results}",
        markup=False,
    )
    _report(out, console, force)
    if errors:
        raise typer.Exit(1)


def _report(out: Path, console: Any, force: bool = False) -> None:
    """Write the sweep report into ``out`` where the sweep report writer is installed."""
    try:
        from moesim.report.sweep import (  # type: ignore[import-not-found,unused-ignore]
            write_sweep_report,
        )
    except ImportError:
        return
    written = write_sweep_report(out, out, force=force)
    if isinstance(written, dict) and written:
        console.print(f"wrote {', '.join(str(p) for p in written.values())}", markup=False)
