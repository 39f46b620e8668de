"""``--json`` on every command that prints figures: one JSON object alone on stdout, under
the field names of the files the command writes (trace metadata, results.parquet,
summary.json)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import typer

from moesim.cli import app
from tests.conftest import run_moesim as moesim
from tests.report_fixtures import write_sweep_fixture

#: commands that print no figures: a file written and where (init), a folder rewritten
NO_FIGURES = {"init", "trace upgrade"}


def _commands(group: typer.core.TyperGroup, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, typer.core.TyperGroup):
            out |= _commands(cmd, f"{prefix}{name} ")
        else:
            out[f"{prefix}{name}"] = cmd
    return out


def test_every_command_that_prints_figures_has_json():
    commands = _commands(typer.main.get_command(app))  # type: ignore[arg-type]
    assert len(commands) == 22 and set(commands) >= NO_FIGURES
    lacking = [
        name
        for name, cmd in commands.items()
        if name not in NO_FIGURES and not any("--json" in p.opts for p in cmd.params)  # type: ignore[attr-defined]
    ]
    assert lacking == []


def _json(*args: str) -> dict:
    proc = moesim(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout: nothing else is printed there


def test_trace_synth_json(tmp_path):
    out = tmp_path / "t"
    got = _json(
        "trace", "synth", "--experts", "8", "--top-k", "2", "--layers", "3", "--tokens", "256",
        "--dist", "zipf:1.2", "--steps", "2", "--seed", "3", "--out", str(out), "--json",
    )  # fmt: skip
    assert got == {
        "trace": str(out),
        "layers": [0, 1, 2],
        "tokens": 256,
        "num_experts": 8,
        "top_k": 2,
        "model": "synthetic",
        "source": "moesim trace synth --dist zipf:s=1.2",
        "capture": {"distribution": "zipf:s=1.2", "seed": 3, "steps": 2},
    }


def test_trace_import_json(tmp_path):
    # per layer 8 assignments at top-2: 4 tokens; the counts are exactly the experts' loads
    counts = {"m": {"expert_counts": {"d": [{"0": 4, "1": 2, "2": 2}, {"0": 1, "2": 3, "3": 4}]}}}
    (tmp_path / "c.json").write_text(json.dumps(counts))
    out = tmp_path / "t"
    got = _json(
        "trace", "import", str(tmp_path / "c.json"), "--out", str(out), "--format",
        "counts-json", "--experts", "4", "--top-k", "2", "--model", "m", "--domain", "d",
        "--json",
    )  # fmt: skip
    assert {k: got[k] for k in ("trace", "layers", "tokens", "num_experts", "top_k")} == {
        "trace": str(out),
        "layers": [0, 1],
        "tokens": 4,
        "num_experts": 4,
        "top_k": 2,
    }
    assert set(got) == {
        *("trace", "layers", "tokens", "num_experts", "top_k"),
        *("model", "source", "capture"),
    }


def test_capture_json(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    out = tmp_path / "t"
    got = _json(
        "capture", "hf-config:mixtral", "--out", str(out), "--tokens", "96", "--seq-len", "48",
        "--json",
    )  # fmt: skip
    # 96 tokens in sequences of 48: a batch of 2; tiny Mixtral: 4 MoE layers of 8, top-2
    assert (got["trace"], got["layers"], got["tokens"]) == (str(out), [0, 1, 2, 3], 96)
    assert (got["num_experts"], got["top_k"], got["model"]) == (8, 2, "tiny-mixtral")
    assert (got["capture"]["batch"], got["capture"]["seq_len"]) == (2, 48)
    assert got["capture"]["tokenization"] == "utf8-bytes-mod-256"
    assert got["wall_time_s"] > 0


def test_report_json_of_a_run(tmp_path, flame_dict, write_scenario):
    flame_dict["mode"] = ["training", "decode"]
    scenario = write_scenario(flame_dict)
    assert moesim("simulate", str(scenario), "--out", str(tmp_path / "run")).returncode == 0
    got = _json("report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--json")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert got["info"] == summary["info"] and got["runs"] == summary["runs"]
    assert [r["mode"] for r in got["runs"]] == ["training", "decode"]
    assert got["outputs"] == {
        "report.html": str(tmp_path / "rep" / "report.html"),
        "summary.md": str(tmp_path / "rep" / "summary.md"),
    }


def test_report_json_of_a_sweep(tmp_path):
    results = write_sweep_fixture(tmp_path / "results")
    got = _json("report", str(results), "--out", str(tmp_path / "rep"), "--json")
    rows = got["results"]
    # 2 node counts x 4 capacity factors, then the failed case of 3 nodes
    assert [r["case_index"] for r in rows] == list(range(9))
    assert [r["nodes"] for r in rows] == [1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [r["capacity_factor"] for r in rows[:4]] == [None, 1.0, 1.25, 2.0]
    assert rows[8]["status"] == "error" and rows[8]["step_time_us"] is None  # NaN: null
    columns = pq.read_schema(results / "results.parquet").names
    assert all(list(r) == columns for r in rows)
    assert set(got) == {"results", "outputs"}
