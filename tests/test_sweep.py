"""Sweeps: spec expansion, case ids, the results folder, resume, executors, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from moesim.errors import InputError
from moesim.paths import scenarios_dir
from moesim.scenario import Scenario
from moesim.sweep.results import METRIC_COLUMNS, ResultsFolder, metric_values
from moesim.sweep.run import SweepError, run_case, run_sweep
from moesim.sweep.spec import canonical_json, case_id, load_sweep
from tests.conftest import REPO, assert_one_line_error
from tests.conftest import run_moesim as moesim

DEMO = scenarios_dir() / "demo.yaml"
EXAMPLE = scenarios_dir() / "sweeps" / "example.yaml"


def write_sweep(tmp_path: Path, filename: str = "sweep.yaml", **spec: Any) -> Path:
    """A sweep over the demo scenario (absolute base path), with small fast cases."""
    data: dict[str, Any] = {"name": "t", "base": str(DEMO)} | spec
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


SMALL = {
    "tokens_per_device": [256],
    "mode": ["training"],
    "capacity.factor": [1.0, 2.0],
    "cluster.nodes": [1, 2],
}


# ----- spec expansion ---------------------------------------------------------------------


def test_grid_expands_every_combination_last_axis_fastest(tmp_path):
    path = write_sweep(tmp_path, axes={"capacity.factor": [1.0, 1.5, 2.0], "cluster.nodes": [1, 2]})
    sweep = load_sweep(path)
    # the base lists two modes: each combination becomes one case per mode
    assert len(sweep.cases) == 3 * 2 * 2
    assert sweep.columns == ["capacity.factor", "cluster.nodes", "mode"]
    assert sweep.cases[1].overrides == {
        "capacity.factor": 1.0,
        "cluster.nodes": 1,
        "mode": "prefill",
    }
    got = [
        (c.overrides["capacity.factor"], c.overrides["cluster.nodes"], c.scenario["mode"])
        for c in sweep.cases
    ]
    assert got[:5] == [
        (1.0, 1, "training"),
        (1.0, 1, "prefill"),
        (1.0, 2, "training"),
        (1.0, 2, "prefill"),
        (1.5, 1, "training"),
    ]
    assert [c.index for c in sweep.cases] == list(range(12))
    c = sweep.cases[4]
    assert c.scenario["capacity"] == {"factor": 1.5, "overflow": "drop"}
    assert c.scenario["cluster"] == {"nodes": 1, "devices_per_node": 8}
    assert c.scenario["hardware"] == "H100-SXM"  # the rest comes from the base
    assert sweep.base_dir == DEMO.parent


def test_zip_pairs_values_and_cases_cross_axes(tmp_path):
    path = write_sweep(
        tmp_path,
        axes={"capacity.factor": [1.0, 2.0], "cluster.nodes": [1, 2], "mode": ["training"]},
        grid=False,
    )
    sweep = load_sweep(path)
    assert [
        (c.scenario["capacity"]["factor"], c.scenario["cluster"]["nodes"]) for c in sweep.cases
    ] == [(1.0, 1), (2.0, 2)]
    path = write_sweep(
        tmp_path,
        cases=[{"hardware": "B200"}, {"hardware": "H100-SXM", "capacity.overflow": "reroute"}],
        axes={"cluster.nodes": [1, 2], "mode": ["prefill"]},
    )
    sweep = load_sweep(path)
    assert sweep.columns == ["cluster.nodes", "mode", "hardware", "capacity.overflow"]
    assert [
        (
            c.scenario["hardware"],
            c.scenario["capacity"]["overflow"],
            c.scenario["cluster"]["nodes"],
        )
        for c in sweep.cases
    ] == [
        ("B200", "drop", 1),
        ("B200", "drop", 2),
        ("H100-SXM", "reroute", 1),
        ("H100-SXM", "reroute", 2),
    ]
    assert sweep.cases[2].overrides == {
        "hardware": "H100-SXM",
        "capacity.overflow": "reroute",
        "cluster.nodes": 1,
        "mode": "prefill",
    }


def test_any_scenario_field_by_dotted_path_and_inline_base(tmp_path):
    base = yaml.safe_load(DEMO.read_text())
    base["routing"] = {"trace": str(DEMO.parent / base["routing"]["trace"])}
    del base["hardware"]  # the axes may supply fields the base lacks
    path = write_sweep(
        tmp_path,
        base=base,
        axes={
            "hardware": ["TPU-v5p"],
            "network.tier": ["analytic", "flow"],
            "stragglers.slow_devices": [{}, {3: 1.5}],
            "overlap": [True],
        },
    )
    sweep = load_sweep(path)
    assert len(sweep.cases) == 2 * 2 * 2
    assert sweep.base_dir == tmp_path
    assert sweep.cases[-1].scenario["stragglers"]["slow_devices"] == {"3": 1.5}
    assert sweep.cases[-1].scenario["network"]["tier"] == "flow"
    assert {c.scenario["hardware"] for c in sweep.cases} == {"TPU-v5p"}


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ({"axes": {"capacity.factr": [1.0]}}, ["field 'capacity.factr'", "unknown field", "1.0"]),
        ({"axes": {"nodes": [2]}}, ["field 'nodes'", "unknown field"]),
        ({"axes": {"capacity.factor": []}}, ["field 'axes.capacity.factor'", "no values"]),
        ({"axes": {"capacity.factor": [-1]}}, ["field 'capacity.factor'", "value -1"]),
        ({"axes": {"hardware.name": ["B200"]}}, ["field 'hardware.name'", "not a mapping"]),
        ({"axes": {"capacity": [{}], "capacity.factor": [1]}}, ["capacity.factor", "overlaps"]),
        (
            {"axes": {"seed": [1, 2], "steps": [1, 2, 3]}, "grid": False},
            ["field 'axes.seed'", "'steps' has 3 values"],
        ),
        ({"axes": {"seed": [1, 1]}}, ["same scenario as case 0"]),
        ({"cases": []}, ["field 'cases'", "no cases"]),
        ({}, ["give 'axes' or 'cases'"]),
        ({"axes": {"seed": 3}}, ["field 'axes.seed'", "valid list"]),
        ({"axes": {"seed": [1]}, "grids": True}, ["field 'grids'", "unknown field"]),
    ],
)
def test_bad_sweep_files_name_file_field_value(tmp_path, spec, needles):
    path = write_sweep(tmp_path, **spec)
    with pytest.raises(InputError) as exc:
        load_sweep(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


# ----- case ids ---------------------------------------------------------------------------


def test_drop_budget_of_a_sweep(tmp_path):
    axes = {"capacity.factor": [None, 1.0]}
    plain = load_sweep(write_sweep(tmp_path, "a.yaml", axes=axes))
    assert plain.spec.max_drop_rate == 0.0
    # the default budget leaves the sweep id as it was before sweeps had one
    base = yaml.safe_load(DEMO.read_text())
    spec = {"name": "t", "base": str(DEMO), "axes": axes, "grid": True, "cases": None}
    text = canonical_json(spec | {"base": base})
    assert plain.sweep_id == hashlib.sha256(text.encode()).hexdigest()
    budget = load_sweep(write_sweep(tmp_path, "b.yaml", axes=axes, max_drop_rate=0.01))
    assert budget.spec.max_drop_rate == 0.01 and budget.sweep_id != plain.sweep_id
    assert [c.case_id for c in budget.cases] == [c.case_id for c in plain.cases]
    assert_one_line_error(
        moesim("sweep", str(write_sweep(tmp_path, "c.yaml", axes=axes, max_drop_rate=1.5)),
                   "--out", str(tmp_path / "o")),
        "field 'max_drop_rate'", "1.5",
    )  # fmt: skip


def test_case_id_is_hash_of_the_full_canonical_scenario(tmp_path):
    one = load_sweep(write_sweep(tmp_path, "a.yaml", axes={"capacity.factor": [1], "seed": [7]}))
    # other spelling (1.0 for 1, other key order), other file and folder: same cases
    other = tmp_path / "elsewhere"
    other.mkdir()
    two = load_sweep(
        write_sweep(other, "b.yaml", axes={"seed": [7], "capacity.factor": [1.0]}, name="x")
    )
    assert [c.case_id for c in one.cases] == [c.case_id for c in two.cases]
    c = one.cases[0]
    scenario = Scenario.model_validate(c.scenario)
    text = json.dumps(scenario.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert c.case_id == hashlib.sha256(text.encode()).hexdigest()[:16] == case_id(scenario)
    assert canonical_json(c.scenario) == text
    assert len(c.case_id) == 16
    # any change to the scenario changes the id; the two modes differ
    three = load_sweep(write_sweep(tmp_path, "c.yaml", axes={"capacity.factor": [1], "seed": [8]}))
    assert {c.case_id for c in three.cases}.isdisjoint(c.case_id for c in one.cases)
    assert one.cases[0].case_id != one.cases[1].case_id
    # load again: the same ids and the same sweep id
    again = load_sweep(tmp_path / "a.yaml")
    assert [c.case_id for c in again.cases] == [c.case_id for c in one.cases]
    assert again.sweep_id == one.sweep_id != two.sweep_id


def test_summary_figures_map_onto_the_metric_columns():
    summary = {
        "step_time_us": 10.0,
        "breakdown_us": {"expert_us": 4.0, "wait_us": 1.0, "new_phase_us": 2.0},
        "tokens_per_s": 5,
        "routed_balance": [1.5, 2.5, 2.0],
        "processed_balance": [1.5, 2.0, 2.0],
        "straggler_penalty": [0.1, 0.3],
        "drop_rate": 0.0,
        "memory_per_device_bytes": 80e9,
    }
    got = metric_values(summary)
    assert list(got) == list(METRIC_COLUMNS)
    assert got["step_time_us"] == 10.0 and got["expert_us"] == 4.0 and got["wait_us"] == 1.0
    assert got["tokens_per_s"] == 5.0 and isinstance(got["tokens_per_s"], float)
    assert (got["routed_balance"], got["routed_balance_mean"]) == (2.5, 2.0)
    assert got["processed_balance"] == 2.0
    assert got["straggler_penalty"] == 0.3
    assert got["memory_per_device_bytes"] == 80e9  # taken when the simulation gives it
    assert got["dispatch_us"] is None and got["cross_node_bytes"] is None  # absent: null


# ----- running ----------------------------------------------------------------------------


class CountingExecutor(Executor):
    """Runs submissions on a thread pool and remembers what was submitted."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(2)
        self.submitted: list[int] = []

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        self.submitted.append(args[0].index)
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self.pool.shutdown(wait=wait)


def _run(path: Path, out: Path, executor: Executor) -> tuple[Any, ResultsFolder]:
    sweep = load_sweep(path)
    folder = ResultsFolder(out, sweep)
    return run_sweep(sweep, folder, executor, source="sweep.yaml"), folder


def test_results_table_follows_the_schema(tmp_path):
    path = write_sweep(tmp_path, axes=SMALL)
    ex = CountingExecutor()
    run, _ = _run(path, tmp_path / "out", ex)
    assert (run.total, run.skipped, run.ran, run.failed) == (4, 0, 4, 0)
    out = tmp_path / "out"
    assert (out / "sweep.yaml").read_bytes() == path.read_bytes()
    meta = json.loads((out / "sweep.json").read_text())
    assert meta == {
        "sweep_id": load_sweep(path).sweep_id,
        "cases": 4,
        "created_by": "moesim sweep",
        "max_drop_rate": 0.0,
    }
    table = pq.read_table(out / "results.parquet")
    names = table.schema.names
    assert names[:5] == ["case_id", "case_index", "status", "error", "axes"]
    assert names[5:9] == ["capacity.factor", "cluster.nodes", "hardware", "model"]
    assert str(table.schema.field("case_index").type) == "int32"
    assert str(table.schema.field("cluster.nodes").type) == "int64"
    for col in METRIC_COLUMNS:
        assert str(table.schema.field(col).type) == "double"
    rows = table.to_pylist()
    assert [r["case_index"] for r in rows] == [0, 1, 2, 3]
    r = rows[3]
    assert r["status"] == "ok" and r["error"] is None
    assert json.loads(r["axes"]) == {
        "tokens_per_device": 256,
        "mode": "training",
        "capacity.factor": 2.0,
        "cluster.nodes": 2,
    }
    assert (r["nodes"], r["num_devices"], r["devices_per_node"]) == (2, 16, 8)
    assert (r["capacity_factor"], r["tokens_per_device"], r["mode"]) == (2.0, 256, "training")
    assert (r["hardware"], r["model"]) == ("H100-SXM", "moesim-reference")
    # the row holds exactly the simulation's figures
    scenario = Scenario.model_validate(load_sweep(path).cases[3].scenario)
    from moesim.sim.simulate import simulate

    summary = simulate(scenario, DEMO.parent).runs[0].summary
    expected = metric_values(summary)
    assert {k: r[k] for k in expected} == expected
    assert r["routed_balance"] == max(summary["routed_balance"])
    assert r["straggler_penalty"] == max(summary["straggler_penalty"])
    assert r["expert_us"] == summary["breakdown_us"]["expert_us"]
    assert r["memory_per_device_bytes"] == summary["memory_per_device_bytes"] > 0
    timings = pq.read_table(out / "timings.parquet").to_pylist()
    assert [t["case_id"] for t in timings] == [r["case_id"] for r in rows]
    assert all(t["elapsed_s"] > 0 for t in timings)


def test_rerun_skips_done_cases_and_fills_in_the_rest(tmp_path):
    path = write_sweep(tmp_path, axes=SMALL)
    full = tmp_path / "full"
    _run(path, full, CountingExecutor())
    again = CountingExecutor()
    run, _ = _run(path, full, again)
    assert again.submitted == [] and (run.skipped, run.ran) == (4, 0)
    # a folder holding two of the four cases (as a killed sweep leaves it)
    part = tmp_path / "part"
    sweep = load_sweep(path)
    folder = ResultsFolder(part, sweep)
    folder.create()
    folder.add([run_case(c, str(sweep.base_dir), "sweep.yaml") for c in sweep.cases[1:3]])
    before = (part / "results.parquet").read_bytes()
    assert pq.read_table(part / "results.parquet").num_rows == 2
    rest = CountingExecutor()
    run, _ = _run(path, part, rest)
    assert rest.submitted == [0, 3] and (run.skipped, run.ran) == (2, 2)
    assert (part / "results.parquet").read_bytes() == (full / "results.parquet").read_bytes()
    assert before != (part / "results.parquet").read_bytes()


def test_failing_case_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = write_sweep(
        tmp_path,
        axes={
            "hardware": ["H100-SXM", "NoSuchGPU"],
            "tokens_per_device": [256],
            "mode": ["prefill"],
        },
        cases=[{"stragglers.slow_devices": {}}, {"stragglers.slow_devices": {99: 2.0}}],
    )
    run, folder = _run(path, tmp_path / "out", CountingExecutor())
    assert (run.ran, run.failed) == (4, 3)
    rows = folder.table().to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error"]
    err = rows[1]["error"]
    assert "sweep.yaml case 1" in err and "hardware" in err and "NoSuchGPU" in err
    assert "stragglers" in rows[2]["error"] and "99" in rows[2]["error"]
    for r in rows[1:]:
        assert "\n" not in r["error"]
        assert all(r[c] is None for c in METRIC_COLUMNS)
        assert r["nodes"] == 2 and r["mode"] == "prefill"  # inputs are there for error rows
    assert rows[0]["step_time_us"] > 0
    assert rows[2]["stragglers.slow_devices"] == '{"99":2.0}'  # non-scalars as JSON text
    # errors are finished cases: a re-run does not retry them
    again = CountingExecutor()
    _run(path, tmp_path / "out", again)
    assert again.submitted == []


class FailingExecutor(CountingExecutor):
    """An executor that loses case 2 (as when a worker process dies)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        if args[0].index != 2:
            return super().submit(fn, *args, **kwargs)
        fut: Future = Future()
        fut.set_exception(RuntimeError("worker lost"))
        return fut


def test_case_the_executor_loses_is_left_for_the_rerun(tmp_path):
    path = write_sweep(tmp_path, axes=SMALL)
    sweep = load_sweep(path)
    folder = ResultsFolder(tmp_path / "out", sweep)
    with pytest.raises(SweepError, match=r"1 case\(s\) did not run, e.g. case 2 .*worker lost"):
        run_sweep(sweep, folder, FailingExecutor())
    kept = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["case_index"] for r in kept] == [0, 1, 3]  # the others went on
    again = CountingExecutor()
    run, folder = _run(path, tmp_path / "out", again)
    assert again.submitted == [2] and run.ran == 1
    assert [r["case_index"] for r in folder.table().to_pylist()] == [0, 1, 2, 3]


def test_process_pool_and_dask_give_identical_bytes(tmp_path):
    distributed = pytest.importorskip("distributed")
    path = write_sweep(tmp_path, axes=SMALL)
    with ProcessPoolExecutor(2) as pool:
        _run(path, tmp_path / "local", pool)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        _run(path, tmp_path / "dask", client.get_executor(pure=False))
    local = (tmp_path / "local" / "results.parquet").read_bytes()
    assert local == (tmp_path / "dask" / "results.parquet").read_bytes()
    assert pq.read_table(tmp_path / "local" / "results.parquet").num_rows == 4


# ----- the command line -------------------------------------------------------------------


def test_cli_sweep_prints_table_and_resumes(tmp_path):
    path = write_sweep(tmp_path, axes=SMALL)
    out = tmp_path / "out"
    proc = moesim("sweep", str(path), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "4 cases (4 ok, 0 failed): 4 run now" in proc.stdout
    for needle in ("capacity.factor", "cluster.nodes", "step ms", "balance", "drop %"):
        assert needle in proc.stdout
    assert "4 cases, 0 already done, 4 to run on 2 local processes" in proc.stderr
    # ends with the sweep report of the results folder
    assert f"wrote {out / 'report.html'}" in proc.stdout
    assert (out / "report.html").stat().st_size > 0 and (out / "summary.md").is_file()
    first = (out / "results.parquet").read_bytes()
    proc = moesim("sweep", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "all 4 cases already done" in proc.stderr
    assert "0 run now" in proc.stdout and "4 already done" in proc.stdout
    assert (out / "results.parquet").read_bytes() == first


def test_cli_failed_cases_exit_1(tmp_path):
    path = write_sweep(
        tmp_path, axes={"hardware": ["NoSuchGPU"], "tokens_per_device": [256], "mode": ["prefill"]}
    )
    proc = moesim("sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "1")
    assert proc.returncode == 1, proc.stderr
    assert "1 cases (0 ok, 1 failed)" in proc.stdout
    assert "case 0 failed:" in proc.stdout and "NoSuchGPU" in proc.stdout


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    bad = write_sweep(tmp_path, "bad.yaml", axes={"capacity.factr": [1.0]})
    assert_one_line_error(
        moesim("sweep", str(bad), "--out", str(tmp_path / "o1")),
        "bad.yaml",
        "field 'capacity.factr'",
        "unknown field",
    )
    empty = write_sweep(tmp_path, "empty.yaml", axes={"cluster.nodes": []})
    assert_one_line_error(
        moesim("sweep", str(empty), "--out", str(tmp_path / "o2")),
        "empty.yaml",
        "field 'axes.cluster.nodes'",
    )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    good = write_sweep(tmp_path, axes=SMALL)
    o3 = str(tmp_path / "o3")
    assert_one_line_error(
        moesim("sweep", str(good), "--out", o3, "--address", "tcp://x:1"),
        "field 'address'",
        "--executor dask",
    )
    assert_one_line_error(
        moesim("sweep", str(good), "--out", o3, "--executor", "dask", "--address", "nonsense"),
        "field 'address'",
        "not a scheduler address",
    )
    assert_one_line_error(
        moesim("sweep", str(good), "--out", o3, "--workers", "0"),
        "field 'workers'",
    )
    assert_one_line_error(moesim("sweep", str(tmp_path / "nope.yaml"), "--out", o3), "not found")
    assert not (tmp_path / "o3").exists()


def test_cli_unreachable_dask_scheduler_fails_fast(tmp_path):
    good = write_sweep(tmp_path, axes=SMALL)
    t0 = time.monotonic()
    proc = moesim(
        "sweep",
        str(good),
        "--out",
        str(tmp_path / "out"),
        "--executor",
        "dask",
        "--address",
        "tcp://127.0.0.1:9",
        timeout=60,
    )
    assert time.monotonic() - t0 < 20
    assert_one_line_error(proc, "field 'address'", "tcp://127.0.0.1:9", "does not answer")
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_refuses_a_results_folder_from_another_sweep(tmp_path):
    one = write_sweep(tmp_path, "one.yaml", axes=SMALL)
    out = tmp_path / "out"
    _run(one, out, CountingExecutor())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    two = write_sweep(tmp_path, "two.yaml", axes=SMALL | {"seed": [3]})
    assert_one_line_error(
        moesim("sweep", str(two), "--out", str(out)),
        "sweep.json",
        "results folder from another sweep",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a folder of other files (a simulate output, say) is not overwritten
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "report.html").write_text("<html></html>")
    assert_one_line_error(
        moesim("sweep", str(one), "--out", str(sim)), "not a sweep results folder", "report.html"
    )
    assert [p.name for p in sim.iterdir()] == ["report.html"]
    # a results table without sweep.json is not ours either
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "results.parquet", other / "results.parquet")
    assert_one_line_error(
        moesim("sweep", str(one), "--out", str(other)), "results folder from another sweep"
    )


def _rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError):
        return 0


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO)}  # workers import this checkout's moesim
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), *args],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_example_sweep_identical_on_local_and_dask_scheduler_with_two_workers(tmp_path):
    """The issue's check: `dask scheduler` and two `dask worker` processes on this machine."""
    pytest.importorskip("distributed")
    sched_file = tmp_path / "scheduler.json"
    procs = [
        _start(
            ["scheduler", "--scheduler-file", str(sched_file), "--port", "0", "--no-dashboard"],
            tmp_path / "scheduler.log",
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        dask_sweep = ["sweep", str(EXAMPLE), "--out", str(tmp_path / "dask")]
        dask_sweep += ["--executor", "dask", "--address", address]
        assert_one_line_error(  # a scheduler without workers would never run a case
            moesim(*dask_sweep),
            "field 'address'",
            "has no workers",
        )
        for i in range(2):
            procs.append(
                _start(
                    ["worker", address, "--nthreads", "1", "--no-dashboard"],
                    tmp_path / f"worker{i}.log",
                )
            )
        local = moesim("sweep", str(EXAMPLE), "--out", str(tmp_path / "local"), "--workers", "2")
        assert local.returncode == 0, local.stderr
        dask = moesim(*dask_sweep)
        assert dask.returncode == 0, dask.stderr
        assert f"to run on the Dask scheduler at {address}" in dask.stderr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    a = (tmp_path / "local" / "results.parquet").read_bytes()
    assert a == (tmp_path / "dask" / "results.parquet").read_bytes()
    rows = pq.read_table(tmp_path / "local" / "results.parquet").to_pylist()
    assert len(rows) >= 12 and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_cli_dask_local_cluster_matches_process_pool(tmp_path):
    pytest.importorskip("distributed")
    path = write_sweep(tmp_path, axes=SMALL)
    local = moesim("sweep", str(path), "--out", str(tmp_path / "local"), "--workers", "2")
    assert local.returncode == 0, local.stderr
    dask = moesim(
        "sweep", str(path), "--out", str(tmp_path / "dask"), "--executor", "dask", "--workers", "2"
    )
    assert dask.returncode == 0, dask.stderr
    assert "to run on 2 local Dask workers" in dask.stderr
    a = (tmp_path / "local" / "results.parquet").read_bytes()
    assert a == (tmp_path / "dask" / "results.parquet").read_bytes()


def test_a_sweep_larger_than_max_cases_is_refused_before_it_expands(tmp_path):
    """A 2,000 x 2,000 grid is 4,000,000 cases: refused in one line, nothing built; a cap
    above the count lets it through."""
    from moesim.errors import InputError

    big = write_sweep(tmp_path, axes={"seed": list(range(2000)), "tokens_per_device":
                                      list(range(1, 2001))})  # fmt: skip
    with pytest.raises(InputError, match="expands to 4,000,000 cases, more than") as err:
        load_sweep(big)
    assert (err.value.field, err.value.value) == ("axes", 4_000_000)
    small = write_sweep(tmp_path, "s.yaml", axes={"seed": [1, 2, 3], "capacity.factor": [1, 2]})
    with pytest.raises(InputError, match="expands to 6 cases"):
        load_sweep(small, max_cases=5)
    # the demo's two modes make each combination two cases
    with pytest.raises(InputError, match="more than --max-cases 6 cases"):
        load_sweep(small, max_cases=6)
    assert len(load_sweep(small, max_cases=12).cases) == 12
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "sweep", str(big), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_json_rows_use_the_results_tables_names(tmp_path):
    """`sweep --json`: one object per case, keyed as results.parquet's columns."""
    import json

    import pyarrow.parquet as pq

    from tests.conftest import run_moesim

    out = tmp_path / "s"
    proc = run_moesim("sweep", "scenarios/sweeps/tour.yaml", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    table = pq.read_table(out / "results.parquet")
    assert printed["out"] == str(out / "results.parquet")
    assert len(printed["results"]) == table.num_rows == 8  # tour.yaml's 8 cases
    assert all(list(r) == table.schema.names for r in printed["results"])
