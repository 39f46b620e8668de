"""The command line as a user meets it: output, JSON, determinism and one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.sim.stragglers import CAUSES
from tests.conftest import FLAME_TRACE, REPO, assert_one_line_error
from tests.conftest import run_moesim as moesim

OUTPUTS = (
    "report.html",
    "summary.md",
    "summary.json",
    "metrics.parquet",
    "phases.parquet",
    "layers.parquet",
    "timeline.json",
)


def test_help_lists_commands():
    proc = moesim("--help")
    assert proc.returncode == 0
    for cmd in (
        "demo",
        "simulate",
        "models",
        "hardware",
        "trace",
        "kernels",
        "capture",
        "train-reference",
        "place",
    ):
        assert cmd in proc.stdout
    for sub in (("simulate", "--help"), ("hardware", "show", "--help"), ("models", "--help")):
        assert moesim(*sub).returncode == 0


def test_demo_writes_four_files_and_summary(tmp_path):
    proc = moesim("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    for name in OUTPUTS:
        assert (tmp_path / "demo" / name).stat().st_size > 0
    out = proc.stdout
    for needle in (
        "[training] step time",
        "[prefill] step time",
        "expert compute",
        "dispatch",
        "combine",
        "dropless: all 524,288 assignments processed",  # 32,768 tokens × top-4 × 4 layers
        "memory per device",
        "of 80.0 GB HBM: fits",
        "balance",
        "straggler",
        "Placement: contiguous (Megatron default) vs greedy + 16 redundant",
    ):
        assert needle in out
    assert (tmp_path / "demo" / "contiguous" / "report.html").is_file()
    timeline = json.loads((tmp_path / "demo" / "timeline.json").read_text())
    events = timeline["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(16))
    assert {e["tid"] for e in spans} == {0, 1, 2}  # compute, send and receive tracks
    sends = [e for e in spans if e["tid"] == 1]
    assert sends and all("sent_bytes" in e["args"] for e in sends)
    phases = pq.read_table(tmp_path / "demo" / "phases.parquet").to_pandas()
    assert not phases.duplicated(["mode", "step", "pass", "layer", "device", "phase"]).any()
    assert {
        "start_us",
        "wait_us",
        "duration_us",
        "bytes_sent",
        "bytes_recv",
        "device_load",
        "dropped",
    } <= set(phases.columns)
    # per device and stream, busy and waiting time of the phases add up to the end of the
    # last one; the gradient all-reduce buckets run on their own stream
    train = phases[phases["mode"] == "training"]
    assert set(train["stream"]) == {"main", "grad-allreduce"}
    by = train.groupby(["stream", "device"])
    per_dev = by[["wait_us", "duration_us"]].sum().sum(axis=1)
    ends = (train["start_us"] + train["duration_us"]).groupby([train["stream"], train["device"]])
    np.testing.assert_allclose(per_dev.to_numpy(), ends.max().to_numpy(), rtol=1e-9)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    metrics = pq.read_table(tmp_path / "demo" / "metrics.parquet").to_pandas()
    assert {
        "mode",
        "step",
        "layer",
        "device",
        "device_load",
        "expert_us",
        "dispatch_us",
        "combine_us",
        "wait_us",
    } <= set(metrics.columns)
    assert not metrics.duplicated(["mode", "step", "pass", "layer", "device"]).any()
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("<svg") >= 3
    for external in ('src="http', "src='http", 'href="http', "<link", "<script src"):
        assert external not in html  # self-contained: nothing fetched from the network


def test_demo_compares_planned_and_contiguous_placement(tmp_path):
    proc = moesim("demo", "--out", str(tmp_path / "demo"), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    planned = {r["mode"]: r for r in data["runs"]}
    contiguous = {r["mode"]: r for r in data["contiguous_runs"]}
    assert set(planned) == set(contiguous) == {"training", "prefill"}
    for mode in planned:
        assert planned[mode]["capacity_factor"] is None and planned[mode]["drop_rate"] == 0.0
        assert contiguous[mode]["drop_rate"] == 0.0
    text = moesim("demo", "--out", str(tmp_path / "again")).stdout
    for mode in ("training", "prefill"):
        tb, tp = contiguous[mode]["step_time_us"], planned[mode]["step_time_us"]
        line = (
            f"[{mode}] step time {tb / 1e3:.3f} ms -> {tp / 1e3:.3f} ms "
            f"({tp - tb:+.1f} µs, {100 * (tp - tb) / tb:+.1f}%)"
        )
        assert line in text
    for label, runs in (("contiguous", contiguous), ("greedy + 16 redundant", planned)):
        s = runs["training"]
        worst = s["routed_balance"].index(max(s["routed_balance"]))
        assert (
            f"{label}: worst routed balance {s['routed_balance'][worst]:.3f} (layer "
            f"{s['layers'][worst]}), straggler device {s['straggler_device'][worst]} "
            f"({s['straggler_cause'][worst]}, +{100 * s['straggler_penalty'][worst]:.1f}% "
            f"over the mean {s['straggler_phase'][worst]} time)"
        ) in text


def test_strict_exits_2_when_memory_does_not_fit(tmp_path, write_scenario):
    # Mixtral-8x7B decoding 64 sequences of 4,096 tokens on 2 H100s: 4 experts of each of
    # 32 MoE layers (45.1 GB) and 64 × 4,096 tokens of KV cache (34.4 GB) per device, with
    # 3.2 GB of dense weights: over 80 GB
    data = {
        "name": "too-big",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 2},
        "model": "Mixtral-8x7B",
        "routing": {"synthetic": {"distribution": "uniform"}},
        "mode": "decode",
        "tokens_per_device": 64,
        "sequence_length": 4096,
    }
    scenario = write_scenario(data)
    loose = moesim("simulate", str(scenario), "--out", str(tmp_path / "loose"))
    assert loose.returncode == 0, loose.stderr
    out = loose.stdout
    assert "64 tokens/device (decode: 64 sequences/device, one new token each)" in out
    assert "of 80.0 GB HBM: does NOT fit (dense weights 3.2 GB, expert slots 45.1 GB" in out
    assert "KV cache 34.4 GB" in out and "WARNING: decode does not fit in HBM" in out
    summary = (tmp_path / "loose" / "summary.md").read_text()
    assert "**WARNING: decode does not fit in HBM" in summary
    proc = moesim("simulate", str(scenario), "--out", str(tmp_path / "strict"), "--strict")
    err = assert_one_line_error(proc, "scenario.yaml", "field 'hardware'", "'H100-SXM'", "--strict")
    assert "80.0 GB of HBM" in err
    # outputs were written whole before the error
    assert (tmp_path / "strict" / "report.html").read_bytes() == (
        tmp_path / "loose" / "report.html"
    ).read_bytes()
    fits = write_scenario(data | {"cluster": {"nodes": 1, "devices_per_node": 8}}, "fits.yaml")
    ok = moesim("simulate", str(fits), "--out", str(tmp_path / "fits"), "--strict")
    assert ok.returncode == 0, ok.stderr


def test_simulate_json_and_byte_identical_outputs(tmp_path, flame_dict, write_scenario):
    scenario = write_scenario(flame_dict | {"mode": "prefill", "tokens_per_device": 128})
    runs = []
    for name in ("a", "b"):
        proc = moesim("simulate", str(scenario), "--out", str(tmp_path / name), "--json")
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout))
    data = runs[0]
    assert data["step_time_us"] > 0
    # the per-layer figures are the last step's rows of layers.parquet, under the same names
    lay = pq.read_table(tmp_path / "a" / "layers.parquet").to_pandas()
    lay = lay[lay["step"] == lay["step"].max()].sort_values("layer")
    assert len(lay) == 8 and "balance_ratio" not in lay
    for key in ("expert_balance", "routed_balance", "processed_balance"):
        assert data[key] == [round(float(x), 6) for x in lay[key]], key
    assert data["dropless_capacity_factor"] == [
        round(float(x), 6) for x in lay["dropless_capacity_factor"]
    ]
    assert data["straggler_device"] == lay["straggler_device"].tolist()
    assert data["straggler_cause"] == lay["straggler_cause"].tolist()
    assert set(data["straggler_cause"]) <= set(CAUSES)
    assert 0 <= data["drop_rate"] < 1
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_models_json_lists_presets():
    proc = moesim("models", "--json")
    assert proc.returncode == 0
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert {"DeepSeek-V3", "Mixtral-8x7B", "FLAME-MoE-290M", "Switch-C-2048"} <= names


def test_hardware_list_and_show():
    proc = moesim("hardware", "list", "--json")
    assert proc.returncode == 0
    assert "H100-SXM" in {p["name"] for p in json.loads(proc.stdout)}
    proc = moesim("hardware", "show", "h100-sxm", "--json")
    assert json.loads(proc.stdout)["sources"]["memory.hbm_bandwidth_gbps"]
    assert "source" in moesim("hardware", "show", "H100-SXM").stdout


# ----- bad input: one line naming file, field and value; exit 2; nothing damaged -----------


def test_unknown_scenario_field(tmp_path, flame_dict, write_scenario):
    path = write_scenario(flame_dict | {"capacty": {"factor": 1.0}})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")),
        str(path),
        "capacty",
        "unknown field",
    )


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ncluster: {nodes: 2,\n")
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")), str(path), "not valid YAML"
    )


def test_bad_value_type(tmp_path, flame_dict, write_scenario):
    path = write_scenario(flame_dict | {"tokens_per_device": -5})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")), "tokens_per_device", "-5"
    )


def test_missing_scenario_file(tmp_path):
    assert_one_line_error(
        moesim("simulate", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)),
        "nope.yaml",
        "not found",
    )


def test_missing_trace(tmp_path, flame_dict, write_scenario):
    path = write_scenario(flame_dict | {"routing": {"trace": "no/such/trace"}})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")),
        str(path),
        "routing.trace",
        "no/such/trace",
    )


def test_unknown_hardware(tmp_path, flame_dict, write_scenario):
    path = write_scenario(flame_dict | {"hardware": "H1000"})
    err = assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")), "hardware", "H1000", "H100-SXM"
    )
    assert str(path) in err


def test_unknown_model(tmp_path, flame_dict, write_scenario):
    path = write_scenario(flame_dict | {"model": "GPT-5-MoE"})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")),
        str(path),
        "model",
        "GPT-5-MoE",
        "DeepSeek-V3",
    )


def test_unknown_hardware_in_show():
    assert_one_line_error(moesim("hardware", "show", "nope"), "nope", "valid names")


def test_trace_model_mismatch(tmp_path, flame_dict, write_scenario):
    path = write_scenario(flame_dict | {"model": "Mixtral-8x7B"})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")), "num_experts", "64"
    )


def test_expert_id_out_of_range_and_outputs_untouched(tmp_path, flame_dict, write_scenario):
    out = tmp_path / "out"
    good = write_scenario(flame_dict | {"mode": "prefill", "tokens_per_device": 128}, "good.yaml")
    assert moesim("simulate", str(good), "--out", str(out)).returncode == 0
    before = {n: (out / n).read_bytes() for n in OUTPUTS}

    bad_trace = tmp_path / "bad-trace"
    shutil.copytree(FLAME_TRACE, bad_trace)
    part = bad_trace / "layer=5" / "part-0.parquet"
    table = pq.read_table(part)
    ids = table.column("expert_ids").to_pylist()
    ids[17][2] = 99
    col = pa.array(ids, type=table.schema.field("expert_ids").type)
    pq.write_table(
        table.set_column(table.schema.get_field_index("expert_ids"), "expert_ids", col), part
    )
    bad = write_scenario(flame_dict | {"routing": {"trace": str(bad_trace)}}, "bad.yaml")
    assert_one_line_error(
        moesim("simulate", str(bad), "--out", str(out)), "layer=5", "expert_ids", "99"
    )
    assert {n: (out / n).read_bytes() for n in OUTPUTS} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temp files left


@pytest.mark.parametrize("payload", ["not parquet at all", ""])
def test_corrupt_trace_file(tmp_path, flame_dict, write_scenario, payload):
    bad_trace = tmp_path / "corrupt"
    shutil.copytree(FLAME_TRACE, bad_trace)
    (bad_trace / "layer=3" / "part-0.parquet").write_text(payload)
    path = write_scenario(flame_dict | {"routing": {"trace": str(bad_trace)}})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")), "layer=3", "Parquet"
    )


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (
            lambda d: d["memory"].__setitem__("hbm_bandwidth_gbps", -3350),
            ("memory.hbm_bandwidth_gbps", "-3350", "greater than or equal to 0.001"),
        ),
        (lambda d: d["compute"].pop("bf16_dense_tflops"), ("compute.bf16_dense_tflops", "missing")),
        (lambda d: d["sources"].pop("memory.hbm_bytes"), ("memory.hbm_bytes", "sources")),
    ],
)
def test_bad_hardware_profile_file(tmp_path, flame_dict, write_scenario, edit, needles):
    import yaml

    data = yaml.safe_load((REPO / "hardware_profiles" / "H100-SXM.yaml").read_text())
    edit(data)
    (tmp_path / "my-gpu.yaml").write_text(yaml.safe_dump(data))
    path = write_scenario(flame_dict | {"hardware": "my-gpu.yaml"})
    assert_one_line_error(
        moesim("simulate", str(path), "--out", str(tmp_path / "o")), "my-gpu.yaml", *needles
    )
    assert not (tmp_path / "o").exists()


def test_output_into_a_pipe_is_never_cut():
    """Into a pipe (as here: stdout is not a terminal) tables and help keep full names."""
    table = moesim("hardware", "list")
    assert table.returncode == 0, table.stderr
    assert "…" not in table.stdout
    assert "GB200-NVL72" in table.stdout and "scale-out GB/s" in table.stdout
    help_text = moesim("a2a", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "…" not in help_text.stdout and "╭" not in help_text.stdout  # plain click help
    # the docstring's paragraph re-wrapped whole, not broken where the source broke it
    assert "DeepSeek-V3's 4 of 8 groups" in " ".join(help_text.stdout.split())
