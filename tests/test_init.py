"""`moesim init`: a scenario file in one command, that `moesim simulate` runs as it is."""

from __future__ import annotations

import json

import yaml

from moesim.scenario import load_scenario
from tests.conftest import REFERENCE_TRACE, assert_one_line_error
from tests.conftest import run_moesim as moesim


def test_init_with_a_trace_simulates_as_written(tmp_path):
    out = tmp_path / "ref.yaml"
    proc = moesim(
        "init", str(out), "--model", "moesim-reference", "--hardware", "H100-SXM",
        "--nodes", "2", "--trace", str(REFERENCE_TRACE), "--mode", "prefill",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scenario, _ = load_scenario(out)
    # the profile's 8 devices per node; the trace's 32,768 tokens over 2 x 8 = 16 devices
    assert scenario.cluster.devices_per_node == 8
    assert scenario.tokens_per_device == 32_768 // 16 == 2048
    assert scenario.mode == "prefill"
    assert scenario.capacity.factor is None  # dropless
    assert scenario.routing.trace == REFERENCE_TRACE  # absolute: /tmp shares no folder with it
    assert "# 16 devices" in out.read_text()

    sim = moesim("simulate", str(out), "--out", str(tmp_path / "r"), "--json")
    assert sim.returncode == 0, sim.stderr
    summary = json.loads(sim.stdout)
    assert summary["mode"] == "prefill"
    assert summary["devices"] == 16
    # every token of the trace replayed once: 32,768 tokens x top-4 x 4 MoE layers
    assert summary["assignments"] == 32_768 * 4 * 4


def test_init_synthetic_decode_defaults(tmp_path):
    out = tmp_path / "sub" / "dec.yaml"
    proc = moesim(
        "init", str(out), "--model", "Mixtral-8x7B", "--hardware", "H200", "--nodes", "1",
        "--devices-per-node", "4", "--synthetic", "zipf:1.2", "--mode", "decode",
        "--seed", "7",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(out.read_text())
    assert data["routing"] == {"synthetic": {"distribution": "zipf:1.2", "seed": 7}}
    assert data["cluster"] == {"nodes": 1, "devices_per_node": 4}
    assert data["tokens_per_device"] == 128  # decode: sequences per device
    assert data["seed"] == 7
    assert data["dispatcher"] == "auto"


def test_init_refuses_what_simulate_would(tmp_path):
    out = tmp_path / "s.yaml"
    base = ("--hardware", "H800", "--nodes", "1")
    # the trace's 32 experts against DeepSeek-V3's 256
    mismatch = moesim("init", str(out), "--model", "DeepSeek-V3", *base,
                      "--trace", str(REFERENCE_TRACE))  # fmt: skip
    assert_one_line_error(mismatch, "num_experts", "32", "256")
    bad = moesim("init", str(out), "--model", "DeepSeek-V3", *base, "--synthetic", "zipf:x")
    assert_one_line_error(bad, "routing.synthetic.distribution", "zipf:x")
    neither = moesim("init", str(out), "--model", "DeepSeek-V3", *base)
    assert_one_line_error(neither, "--trace or --synthetic")
    unknown = moesim("init", str(out), "--model", "nope", *base, "--synthetic", "uniform")
    assert_one_line_error(unknown, "model", "nope")
    assert not out.exists()  # nothing written on any error

    out.write_text("mine\n")
    exists = moesim("init", str(out), "--model", "DeepSeek-V3", *base, "--synthetic", "uniform")
    assert_one_line_error(exists, "--force")
    assert out.read_text() == "mine\n"
    forced = moesim(
        "init", str(out), "--model", "DeepSeek-V3", *base, "--synthetic", "uniform", "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert load_scenario(out)[0].model == "DeepSeek-V3"


def test_init_cycles_a_shorter_trace_over_a_deeper_model(tmp_path):
    """FLAME's 8 trace layers on DeepSeekMoE-16B's 27 MoE layers: layer_map cycle, said."""
    from tests.conftest import FLAME_TRACE

    out = tmp_path / "deep.yaml"
    proc = moesim("init", str(out), "--model", "DeepSeekMoE-16B", "--hardware", "H100-SXM",
                  "--nodes", "1", "--trace", str(FLAME_TRACE), "--mode", "prefill")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert load_scenario(out)[0].routing.layer_map == "cycle"
    assert "8 layers, cycled over the model's 27 MoE layers" in out.read_text()
