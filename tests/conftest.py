"""Shared fixtures: small scenarios written to a temporary folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moesim.paths import scenarios_dir

REPO = Path(__file__).resolve().parent.parent
FLAME_TRACE = scenarios_dir() / "traces" / "flame-moe-290m"
REFERENCE_TRACE = scenarios_dir() / "traces" / "moesim-reference"


@pytest.fixture
def write_scenario(tmp_path: Path):
    """Write a scenario dict as YAML and return its path."""

    def _write(data: dict, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


@pytest.fixture
def flame_dict() -> dict:
    """The bundled FLAME-MoE-290M scenario, with an absolute trace path."""
    data = yaml.safe_load((scenarios_dir() / "flame-moe-290m.yaml").read_text())
    data["routing"] = {"trace": str(FLAME_TRACE)}
    return data


def load_benchmark(name: str):
    """A script of ``benchmarks/`` imported as a module (its folder on ``sys.path``, for the
    scripts that import each other)."""
    import importlib.util

    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_moesim(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``moesim`` command line in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "moesim", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Bad input: exit status 2, no traceback, one line on stderr holding every needle."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def routing_of(copies, expert_tokens):
    """A layer's routing given by hand: ``copies[s, d]`` token copies from s to d (also its
    dispatch), each device's load what it receives, nothing dropped."""
    import numpy as np

    from moesim.sim.routing import LayerRouting

    copies = np.asarray(copies)
    return LayerRouting(
        device_load=copies.sum(axis=0),
        expert_tokens=np.asarray(expert_tokens),
        dispatch=copies,
        copies=copies,
        dropped=np.zeros(copies.shape[0]),
        rerouted=0,
        assignments=int(copies.sum()),
    )


def round_h100(bf16_tflops: float, hbm_gbps: float):
    """H100-SXM with round figures for hand-computed answers: ``bf16_tflops`` and
    ``hbm_gbps`` at efficiency 0.5 (so ``bf16_tflops`` x 5e5 FLOP/us and ``hbm_gbps`` x 500
    bytes/us), no small-batch term; launch 5 us."""
    from moesim.hardware import get_profile

    hw = get_profile("H100-SXM")
    return hw.model_copy(
        update={
            "compute": hw.compute.model_copy(update={"bf16_dense_tflops": bf16_tflops}),
            "memory": hw.memory.model_copy(update={"hbm_bandwidth_gbps": hbm_gbps}),
            "efficiency": hw.efficiency.model_copy(
                update={"gemm": 0.5, "hbm": 0.5, "gemm_half_outputs": None}
            ),
        }
    )
