"""Run a sweep file from Python: what ``moesim sweep`` computes, without the command line.

>>> from moesim.sweep.api import sweep_file  # doctest: +SKIP
>>> done = sweep_file("scenarios/sweeps/example.yaml", "reports/sweep-example", workers=2)
>>> done.run.ran, len(done.errors)  # doctest: +SKIP
(48, 0)

The command also writes the sweep report of the results folder (where the report writer
is installed) and prints the results table; this function runs the cases and returns
their rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from moesim.sweep.run import SweepRun

__all__ = ["SweepOutcome", "sweep_file"]


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`sweep_file` did.

    Attributes:
        name: the sweep's name.
        rows: every case's row (results.parquet's columns), in case order.
        columns: the sweep's axis columns, as results.parquet holds them.
        results: the results.parquet path.
        run: what this run did (cases run, skipped, failed, wall time).
    """

    name: str
    rows: list[dict[str, Any]]
    columns: list[str]
    results: Path
    run: SweepRun

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The rows of the cases that failed (status other than "ok")."""
        return [r for r in self.rows if r["status"] != "ok"]


def sweep_file(
    path: str | Path,
    out: str | Path,
    *,
    executor: Literal["local", "dask"] = "local",
    address: str | None = None,
    workers: int | None = None,
    max_cases: int = 10_000,
    force: bool = False,
    source: str | None = None,
    on_start: Callable[[str, int, int, int], None] | None = None,
    on_result: Callable[[int], None] | None = None,
) -> SweepOutcome:
    """Run every case of the sweep file ``path`` not yet in the results folder ``out``;
    append each to ``out/results.parquet`` as it finishes.

    Args:
        executor, address, workers: where the cases run (``moesim sweep``'s options; a
            process pool of ``workers`` processes by default, one per CPU and case to run).
        max_cases: refuse a sweep that expands to more cases.
        force: write into an existing folder that is not a sweep's.
        source: the sweep file's name as the rows' scenarios record it (default ``path``).
        on_start: ``on_start(message, total, done, failed)`` once the cases are about to
            run (``message``: how many, and where), not called when every case is done.
        on_result: ``on_result(failed)`` after each case, with the failed cases so far.

    Raises:
        moesim.errors.InputError: a bad sweep file, options or results folder.
        moesim.sweep.run.SweepError: the executor failed (finished cases are kept).
    """
    from moesim.sweep.results import ResultsFolder
    from moesim.sweep.run import ExecutorKind, SweepRun, open_executor, run_sweep
    from moesim.sweep.spec import Case, load_sweep

    path, out = Path(path), Path(out)
    sweep = load_sweep(path, max_cases)
    # refuses another sweep's folder and an unwritable one; writes nothing
    folder = ResultsFolder(out, sweep, force=force)
    total = len(sweep.cases)
    pending = len(folder.pending())
    kind: ExecutorKind = executor
    if workers is None and address is None:
        workers = max(1, min(os.cpu_count() or 1, pending or 1))
    if address:
        where = f"the Dask scheduler at {address}"
    else:
        noun = "Dask worker" if kind == "dask" else "process"
        where = (
            f"{workers} local {noun}{'' if workers == 1 else 'es' if noun == 'process' else 's'}"
        )
    if not pending:  # nothing to run: no pool to start, no scheduler to reach
        run = SweepRun(total, total, 0, 0, 0.0)
    else:
        with open_executor(kind, address=address, workers=workers) as pool:
            if on_start is not None:
                on_start(
                    f"sweep {sweep.spec.name!r}: {total} cases, "
                    f"{total - pending} already done, {pending} to run on {where}",
                    total,
                    total - pending,
                    _failed(folder.rows.values()),
                )

            def advance(case: Case, row: dict[str, Any]) -> None:
                if on_result is not None:
                    on_result(_failed(folder.rows.values()))

            run = run_sweep(
                sweep,
                folder,
                pool,
                source=str(path) if source is None else source,
                on_result=advance,
            )
    return SweepOutcome(
        name=sweep.spec.name,
        rows=folder.table().to_pylist(),
        columns=[c for c in sweep.columns if c in folder.schema.names],
        results=out / "results.parquet",
        run=run,
    )


def _failed(rows: Any) -> int:
    return sum(r["status"] != "ok" for r in rows)
