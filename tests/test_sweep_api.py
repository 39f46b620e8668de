"""moesim.sweep.api.sweep_file: a sweep run from Python, as ``moesim sweep`` runs it."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from moesim.errors import InputError
from moesim.sweep.api import sweep_file
from tests.test_sweep import write_sweep


def test_sweep_file_runs_a_tiny_grid_and_resumes(tmp_path):
    # 2 hardware x 1 other value: case 0 runs, case 1 names hardware that does not exist
    path = write_sweep(
        tmp_path,
        axes={
            "hardware": ["H100-SXM", "NoSuchGPU"],
            "tokens_per_device": [256],
            "mode": ["prefill"],
        },
    )
    out = tmp_path / "out"
    started, failed = [], []
    done = sweep_file(
        path,
        out,
        workers=1,
        on_start=lambda *a: started.append(a),
        on_result=failed.append,
    )
    assert started == [("sweep 't': 2 cases, 0 already done, 2 to run on 1 local process", 2, 0, 0)]
    assert failed == [0, 1]  # failed cases so far, after each case
    assert (done.name, done.results) == ("t", out / "results.parquet")
    assert (done.run.total, done.run.skipped, done.run.ran, done.run.failed) == (2, 0, 2, 1)
    assert done.columns == ["hardware", "tokens_per_device", "mode"]
    assert [(r["case_index"], r["hardware"], r["status"]) for r in done.rows] == [
        (0, "H100-SXM", "ok"),
        (1, "NoSuchGPU", "error"),
    ]
    assert [r["case_index"] for r in done.errors] == [1]
    assert "NoSuchGPU" in done.errors[0]["error"]
    # the demo scenario: 2 nodes of 8 devices
    assert done.rows[0]["tokens_per_device"] == 256 and done.rows[0]["num_devices"] == 16
    assert pq.read_table(done.results).to_pylist() == done.rows
    # a re-run finds both cases done: nothing starts, nothing runs, the rows are the same
    again = sweep_file(path, out, on_start=lambda *a: started.append(a))
    assert len(started) == 1
    assert (again.run.total, again.run.skipped, again.run.ran, again.run.failed) == (2, 2, 0, 0)
    assert again.rows == done.rows


def test_sweep_file_refuses_too_many_cases(tmp_path):
    path = write_sweep(tmp_path, axes={"cluster.nodes": [1, 2, 4]})
    with pytest.raises(InputError, match="3"):
        sweep_file(path, tmp_path / "out", max_cases=2)
    assert not (tmp_path / "out").exists()
