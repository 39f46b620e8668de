"""Running a sweep's cases on any ``concurrent.futures`` executor: a local process pool or a
Dask cluster (``distributed.Client(...).get_executor()``), through one code path.

Each finished case goes into the results folder at once (:class:`ResultsFolder.add`); a case
that fails is recorded with its error and the sweep goes on. A case the executor fails to run
(a worker process killed, a scheduler gone) is not recorded: the other cases go on, the
sweep then ends with :class:`SweepError`, and a re-run does the missing cases.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    wait,
)
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moesim.errors import InputError
from moesim.sweep.results import METRIC_COLUMNS, CaseResult, ResultsFolder, case_inputs
from moesim.sweep.spec import Case, Sweep

__all__ = [
    "DASK_CONNECT_TIMEOUT_S",
    "ExecutorKind",
    "SweepError",
    "SweepRun",
    "open_executor",
    "run_case",
    "run_sweep",
]

ExecutorKind = Literal["local", "dask"]

#: how long to wait for a Dask scheduler to answer, and for it to have a worker
DASK_CONNECT_TIMEOUT_S = 5.0

_MAX_ERROR_CHARS = 500


class SweepError(Exception):
    """The executor failed (not a case): the sweep stops; finished cases are kept."""


@dataclass(frozen=True)
class SweepRun:
    """What one run of a sweep did.

    Attributes:
        total: cases in the sweep.
        skipped: cases already in the results folder when the run started.
        ran: cases this run finished (ok or error).
        failed: of those, cases recorded with status "error".
        wall_s: wall time of the run.
    """

    total: int
    skipped: int
    ran: int
    failed: int
    wall_s: float


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def run_case(case: Case, base_dir: str, source: str) -> CaseResult:
    """Simulate one case (runs on a worker); a failure becomes an error row, never a raise.

    Args:
        case: the case, its scenario as a JSON-ready mapping.
        base_dir: folder the scenario's relative paths resolve against.
        source: how errors name where the case comes from (``"<sweep file> case <i>"``).
    """
    from moesim.scenario import Scenario
    from moesim.sweep.results import metric_values

    t0 = time.perf_counter()
    row: dict[str, Any] = {"case_id": case.case_id, "status": "ok", "error": None}
    row |= case_inputs(case.scenario)
    row |= dict.fromkeys(METRIC_COLUMNS)
    try:
        from moesim.sim.simulate import simulate

        scenario = Scenario.model_validate(case.scenario)
        result = simulate(scenario, Path(base_dir), source=source)
        row |= metric_values(result.runs[0].summary)
    except InputError as err:
        row |= {"status": "error", "error": _one_line(str(err))}
    except Exception as err:  # a failing case is recorded and the sweep goes on
        row |= {"status": "error", "error": _one_line(f"{type(err).__name__}: {err}")}
    return CaseResult(case.case_id, row, time.perf_counter() - t0)


def run_sweep(
    sweep: Sweep,
    folder: ResultsFolder,
    executor: Executor,
    *,
    source: str | None = None,
    on_result: Callable[[Case, dict[str, Any]], None] | None = None,
) -> SweepRun:
    """Run the cases ``folder`` does not hold yet on ``executor``; record each as it finishes.

    Args:
        sweep: the loaded sweep.
        folder: its results folder (opened: checked and read; created here if new).
        executor: any ``concurrent.futures.Executor``.
        source: how case errors name the sweep file (default: its path).
        on_result: called with each finished case and its row (for progress display).

    Raises:
        SweepError: the executor failed to run some cases (raised once the others are done;
            they are saved and a re-run does the missing ones).
    """
    t0 = time.perf_counter()
    folder.create()
    pending = folder.pending()
    skipped = len(sweep.cases) - len(pending)
    src = str(sweep.path) if source is None else source
    futures: dict[Future[CaseResult], Case] = {}
    ran = failed = 0
    try:
        for case in pending:
            fut = executor.submit(run_case, case, str(sweep.base_dir), f"{src} case {case.index}")
            futures[fut] = case
        waiting = set(futures)
        lost: list[Future[CaseResult]] = []
        while waiting:
            # every case finished by now is recorded with one rewrite of the tables
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            batch = sorted(done, key=lambda f: futures[f].index)
            lost += [f for f in batch if _failure(f) is not None]
            batch = [f for f in batch if _failure(f) is None]
            rows = folder.add([f.result() for f in batch])
            for fut, row in zip(batch, rows, strict=True):
                ran += 1
                failed += row["status"] != "ok"
                if on_result is not None:
                    on_result(futures[fut], row)
        if lost:  # the executor failed them (run_case itself never raises): not recorded
            first = min(lost, key=lambda f: futures[f].index)
            case, err = futures[first], _failure(first)
            raise SweepError(
                f"{len(lost)} case(s) did not run, e.g. case {case.index} ({case.case_id}): "
                f"{type(err).__name__}: {_one_line(str(err))}; {len(folder.rows)} finished "
                f"cases are saved in {folder.folder}, re-run to do the rest"
            )
    finally:
        for fut in futures:
            fut.cancel()
    return SweepRun(len(sweep.cases), skipped, ran, failed, time.perf_counter() - t0)


def _failure(fut: Future[CaseResult]) -> BaseException | None:
    """Why a finished future has no result (None when it has one)."""
    return CancelledError("cancelled") if fut.cancelled() else fut.exception()


def _exit_with_sweep(sweep_pid: int) -> None:
    """Worker initializer: the worker exits as soon as the sweep's process is gone, so a
    sweep killed outright (SIGKILL) leaves no process behind.

    Workers fork from the forkserver, not from the sweep, and each holds the forkserver's
    liveness pipe open, so neither notices the sweep's death by itself: a thread in each
    worker waits on the sweep's process (a pidfd on Linux, else a poll every 0.5 s) and
    ends the worker. The forkserver then exits (its liveness pipe closes) and so does the
    resource tracker (no process holds its pipe any more).
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(sweep_pid)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd: poll
            while True:
                try:
                    os.kill(sweep_pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except PermissionError:
                    pass
                time.sleep(0.5)
        select.select([fd], [], [])  # readable once the process has exited
        os._exit(1)

    threading.Thread(target=watch, name="moesim-sweep-watch", daemon=True).start()


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Keep distributed's connection-retry log lines off the terminal."""
    log = logging.getLogger("distributed")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _probe_scheduler(address: str, timeout_s: float) -> None:
    """Ask ``address`` for its identity (one request, ``timeout_s`` in all), so that a dead
    or foreign address fails fast and leaves no half-made client behind.

    Raises:
        InputError: the address is malformed, does not answer, or is not a Dask scheduler.
    """
    import asyncio

    from distributed.core import rpc

    async def identity() -> Any:
        async with rpc(address, timeout=timeout_s) as scheduler:
            return await scheduler.identity()

    try:
        info = asyncio.run(asyncio.wait_for(identity(), timeout_s))
    except ValueError as err:
        raise InputError(
            f"not a scheduler address, expected tcp://HOST:PORT ({_one_line(str(err))[:120]})",
            field="address",
            value=address,
        ) from None
    except (OSError, asyncio.TimeoutError) as err:
        raise InputError(
            f"Dask scheduler does not answer within {timeout_s:g} s "
            f"({type(err).__name__}: {_one_line(str(err))[:120]})",
            field="address",
            value=address,
        ) from None
    except Exception as err:  # garbage from something that is not a scheduler
        raise InputError(
            f"no Dask scheduler at this address ({type(err).__name__}: "
            f"{_one_line(str(err))[:120]})",
            field="address",
            value=address,
        ) from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise InputError(
            f"this address is a Dask {kind}, not a scheduler", field="address", value=address
        )


@contextmanager
def open_executor(
    kind: ExecutorKind,
    *,
    address: str | None = None,
    workers: int | None = None,
    connect_timeout_s: float = DASK_CONNECT_TIMEOUT_S,
) -> Iterator[Executor]:
    """A ``concurrent.futures.Executor`` that runs cases.

    Args:
        kind: ``"local"`` (a process pool) or ``"dask"`` (a ``distributed`` client's executor).
        address: the Dask scheduler (``tcp://host:8786``); None starts a LocalCluster.
        workers: processes of the pool or of the LocalCluster (default: CPU count).
        connect_timeout_s: how long a Dask scheduler gets to answer and to show a worker.

    Raises:
        InputError: an address with the local executor, workers with an address, or a
            scheduler that does not answer or has no workers within the timeout.
    """
    if workers is not None and workers < 1:
        raise InputError("need at least one worker", field="workers", value=workers)
    n = workers or os.cpu_count() or 1
    if kind == "local":
        if address is not None:
            raise InputError("--address is for --executor dask", field="address", value=address)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            ctx.set_forkserver_preload(["moesim.sweep.run", "moesim.sim.simulate"])
        # forkserver: workers fork from one process that imported the simulator already;
        # the initializer ties each worker's life to this process (see _exit_with_sweep)
        pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=ctx,
            initializer=_exit_with_sweep,
            initargs=(os.getpid(),),
        )
        ok = False
        try:
            yield pool
            ok = True
        finally:
            pool.shutdown(wait=ok, cancel_futures=True)
        return
    if kind != "dask":
        raise InputError("valid: local, dask", field="executor", value=kind)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError(
            "the dask executor needs the 'distributed' package (pip install distributed)",
            field="executor",
            value=kind,
        ) from None
    cluster = None
    with _quiet_distributed():
        if address is not None:
            if workers is not None:
                raise InputError(
                    "the scheduler's own workers run the cases; drop --workers with --address",
                    field="workers",
                    value=workers,
                )
            _probe_scheduler(address, connect_timeout_s)
            try:
                client = Client(address, timeout=connect_timeout_s, set_as_default=False)
            except Exception as err:
                raise InputError(
                    f"cannot connect to the Dask scheduler ({type(err).__name__}: "
                    f"{_one_line(str(err))[:160]})",
                    field="address",
                    value=address,
                ) from None
            try:
                client.wait_for_workers(1, timeout=connect_timeout_s)
            except Exception:
                client.close()
                raise InputError(
                    f"Dask scheduler has no workers after {connect_timeout_s:g} s "
                    "(start some with: dask worker ADDRESS)",
                    field="address",
                    value=address,
                ) from None
        else:
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster, set_as_default=False)
    executor = client.get_executor(pure=False)
    ok = False
    try:
        yield executor
        ok = True
    finally:
        with _quiet_distributed():
            executor.shutdown(wait=ok)
            client.close()
            if cluster is not None:
                cluster.close()
