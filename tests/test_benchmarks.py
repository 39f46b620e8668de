"""Benchmarks run as tests only on request: pytest -m benchmark."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.benchmark
def test_demo_speed_benchmark_prints_figures():
    proc = subprocess.run(
        [sys.executable, "benchmarks/demo_speed.py", "--json", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["demo_wall_s_median"] < figures["target_s"]


def test_placement_eval_quick_runs_and_checks_targets():
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/placement_eval.py",
            "--json",
            "--quick",
            "--score-layers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's moesim
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    planners = {r["planner"] for r in out["rows"]}
    assert {"eplb-global", "eplb-hierarchical", "affinity", "oracle"} <= planners
    assert {r["dataset"] for r in out["rows"]} >= {"flame-290m", "dsv3-zipf1.0"}
    assert all(r["balance_mean"] >= 1.0 for r in out["rows"])
    assert out["targets"]["cases"] and "balance_le_global" in out["targets"]["cases"][0]
    assert {r["mode"] for r in out["replan"]} == {"static", "full", "limit-20%"}
    assert len(out["targets"]["replan"]) == 6  # 3 planners x 2 replica choices


@pytest.mark.benchmark
def test_plan_capacity_benchmark_prints_figures():
    proc = subprocess.run(
        [sys.executable, "benchmarks/plan_capacity.py", "--json", "--models", "Mixtral-8x7B"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    mixtral = figures["models"]["Mixtral-8x7B"]
    assert mixtral["wall_s"] < figures["target_s"]
    assert set(mixtral["answers"]) == {"H100-SXM", "B200"}


def test_engine_scale_prints_its_figures():
    """The scale benchmark runs (at sizes the default suite can afford) and prints the
    figures it promises for every size."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/engine_scale.py", "--devices", "16", "32", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["devices"] for r in rows] == [16, 32]
    for r in rows:
        assert {"wall_s", "events", "events_per_s", "peak_rss_mb"} <= set(r)
        assert r["events"] > 0 and r["step_time_us"] > 0
