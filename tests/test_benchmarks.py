"""Benchmarks run as tests only on request: pytest -m benchmark."""

import json
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
