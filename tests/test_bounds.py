"""Bounded work: a scenario no machine of this kind can run is refused before it starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from moesim.model.shapes import get_preset
from moesim.scenario import Scenario
from moesim.sim.bounds import scenario_bytes
from tests.conftest import REPO


def _synthetic(**kw) -> dict:
    return {
        "name": "b",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 2, "devices_per_node": 8},
        "model": "FLAME-MoE-290M",
        "routing": {"synthetic": {"distribution": "uniform"}},
        "tokens_per_device": 2048,
        "mode": "prefill",
    } | kw


def test_estimate_by_hand():
    """FLAME-MoE-290M (9 layers, 8 MoE, top-6) on 16 devices, 2,048 tokens each:
    routing 8 bytes x 8 layers x 32,768 tokens x 6 = 12,582,912; traffic 48 x 16^2 =
    12,288; engine 80 bytes x (16 ops x 9 layers) x 16 devices = 184,320."""
    shape = get_preset("FLAME-MoE-290M")
    assert (shape.num_layers, len(shape.moe_layer_indices()), shape.top_k) == (9, 8, 6)
    got = scenario_bytes(Scenario.model_validate(_synthetic()), shape, None)
    assert got == {"routing": 12_582_912.0, "traffic": 12_288.0, "engine": 184_320.0}
    # a trace keeps only its replayed tokens' ids, 1 byte each for 64 experts:
    # 8 layers x 100 tokens x 6 = 4,800; a trace longer than the 32,768 tokens one step
    # replays keeps those: 8 x 32,768 x 6 = 1,572,864; count level holds no tokens
    assert scenario_bytes(Scenario.model_validate(_synthetic()), shape, 100)["routing"] == 4_800
    big = scenario_bytes(Scenario.model_validate(_synthetic()), shape, 10**9)["routing"]
    assert big == 1_572_864
    count = _synthetic(routing={"synthetic": {"distribution": "uniform", "level": "count"}})
    assert scenario_bytes(Scenario.model_validate(count), shape, None)["routing"] == 0


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"cluster": {"nodes": 1_000_000, "devices_per_node": 8}}, "cluster.nodes"),
        ({"steps": 1_000_000_000}, "steps"),
        ({"tokens_per_device": 1_000_000_000_000}, "tokens_per_device"),
    ],
)
def test_sizes_no_machine_runs_are_refused_in_one_line(tmp_path, extra, field):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_synthetic(**extra)))
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "simulate", str(path), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"field '{field}'" in proc.stderr and "GB" in proc.stderr
    assert not (tmp_path / "o").exists()
