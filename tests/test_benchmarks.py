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
