"""Kernel micro-benchmarks: a tiny sweep, the table schema, merging and loader validation."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.costs.work import BenchShape, op_work
from moesim.errors import InputError
from moesim.kernels.bench import (
    CPU_MODELS,
    OPS,
    SWEEP_TOKENS,
    BenchConfig,
    default_config,
    device_name,
    run_bench,
    supported,
    write_results,
)
from moesim.kernels.tables import TABLE_COLUMNS, device_slug, load_table, merge_rows

REPO = Path(__file__).resolve().parents[1]

TINY = BenchShape(
    model="tiny",
    d_model=64,
    d_ff=32,
    num_experts=8,
    local_experts=2,
    top_k=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    v_head_dim=16,
)
TINY_MLA = BenchShape(
    model="tiny-mla",
    d_model=64,
    d_ff=32,
    num_experts=8,
    local_experts=2,
    top_k=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=24,
    v_head_dim=16,
    router_score="sigmoid",
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
)


def tiny_config(**kw: object) -> BenchConfig:
    base = BenchConfig(
        device="cpu",
        shapes=(TINY,),
        dtypes=("fp32", "bf16"),
        tokens=(1, 8),
        warmup=1,
        min_repeats=3,
        max_repeats=5,
        budget_s=0.001,
        max_call_us=1e6,
        max_bytes=1e8,
        threads=1,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_result():
    return run_bench(tiny_config())


def test_tiny_sweep_measures_every_point(tiny_result) -> None:
    rows = tiny_result.rows
    assert list(rows.columns) == list(TABLE_COLUMNS)
    assert len(rows) == len(OPS) * 2 * 2 and not tiny_result.skipped
    assert set(rows["op"]) == set(OPS) and set(rows["dtype"]) == {"fp32", "bf16"}
    assert (rows["median_us"] > 0).all()
    assert (rows["p10_us"] <= rows["median_us"]).all() and (
        rows["median_us"] <= rows["p90_us"]
    ).all()
    assert (rows["min_us"] <= rows["p10_us"]).all()
    assert rows["repeats"].between(3, 5).all() and (rows["threads"] == 1).all()
    assert set(rows["device"]) == {device_name("cpu")}
    ffn = rows[rows["op"] == "expert_ffn_bmm"].iloc[0]
    assert (ffn["d_ff"], ffn["num_experts"], ffn["top_k"]) == (32, 2, 0)
    router = rows[rows["op"] == "router"].iloc[0]
    assert (router["d_ff"], router["num_experts"], router["top_k"]) == (0, 8, 2)
    attn = rows[rows["op"] == "attention"].iloc[0]
    assert (attn["num_heads"], attn["num_kv_heads"], attn["head_dim"]) == (4, 2, 16)
    meta = tiny_result.meta
    assert meta["threads"] == 1 and meta["timer"] == "time.perf_counter"
    assert meta["device_slug"] == device_slug(meta["device"])


def test_mla_attention_and_sigmoid_router_run() -> None:
    result = run_bench(
        tiny_config(shapes=(TINY_MLA,), ops=("attention", "router"), dtypes=("fp32",))
    )
    assert len(result.rows) == 4 and not result.skipped


def test_ffn_variants_compute_the_same_function() -> None:
    """The loop, bmm and grouped_mm builders are the same SwiGLU FFN."""
    import torch

    from moesim.kernels.bench import _build, _Ctx

    gen = torch.Generator().manual_seed(0)
    ctx = _Ctx(torch=torch, device="cpu", dtype=torch.float32, gen=gen)
    outs = {}
    for op in ("expert_ffn_loop", "expert_ffn_bmm", "expert_ffn_grouped"):
        gen.manual_seed(1)
        ctx.weights.clear()
        y = _build(op, TINY, 4, "fp32", ctx)()
        outs[op] = torch.stack(y) if isinstance(y, list) else y.reshape(TINY.local_experts, 4, -1)
    torch.testing.assert_close(outs["expert_ffn_loop"], outs["expert_ffn_bmm"])
    torch.testing.assert_close(outs["expert_ffn_loop"], outs["expert_ffn_grouped"])


def test_time_and_memory_caps_end_a_series() -> None:
    slow = run_bench(
        tiny_config(ops=("memcpy",), dtypes=("fp32",), tokens=(1, 2, 4), max_call_us=0.0)
    )
    assert list(slow.rows["tokens"]) == [1]
    assert slow.skipped[0]["tokens_skipped"] == [2, 4] and "cap" in slow.skipped[0]["reason"]
    big = run_bench(tiny_config(ops=("memcpy",), dtypes=("fp32",), tokens=(1, 4096), max_bytes=1e4))
    assert list(big.rows["tokens"]) == [1]
    assert big.skipped[0]["tokens_skipped"] == [4096] and "memory" in big.skipped[0]["reason"]


_FAULTS_SCRIPT = """
import json, resource, sys, torch
from moesim.kernels.bench import _kept_heap

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = [faults() for _ in range(5)]
with _kept_heap() as desc:
    kept = [faults() for _ in range(9)]
after = [faults() for _ in range(3)]
print(json.dumps({"plain": plain, "kept": kept, "after": after, "desc": desc}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the kept heap is a glibc setting",
)
def test_kept_heap_reuses_pages_of_large_buffers(tiny_result) -> None:
    """A 64 MiB buffer freed and allocated again faults its 16,384 pages in on every call by
    default (glibc mmaps it); with the heap kept, a typical call reuses warm pages. Run in
    a fresh interpreter, as ``moesim kernels bench`` runs: in a long-lived process whose heap
    is fragmented, glibc may still grow the heap for an aligned request instead of reusing
    a freed block (so the bench keeps medians, which such calls do not move)."""
    import resource
    import statistics

    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    pages = 64 * 2**20 // resource.getpagesize()
    assert statistics.median(got["plain"]) >= pages // 2
    assert statistics.median(got["kept"]) < pages // 100, got
    assert statistics.median(got["after"]) >= pages // 2  # glibc defaults back after the run
    assert got["desc"] is not None and "M_MMAP_MAX=0" in got["desc"]
    assert tiny_result.meta["cpu_allocator"].startswith(got["desc"])
    assert "pre-faulted" in tiny_result.meta["cpu_allocator"]


def test_supported_matrix() -> None:
    assert supported("expert_ffn_loop", "fp32", "cpu") is None
    assert "CUDA" in (supported("expert_ffn_loop", "fp8", "cpu") or "")
    assert supported("nope", "fp32", "cpu") is not None
    result = run_bench(tiny_config(ops=("router",), dtypes=("fp8",)))
    assert result.rows.empty and result.skipped[0]["op"] == "router"
    with pytest.raises(InputError, match="unknown op"):
        run_bench(tiny_config(ops=("softmax",)))


def test_work_estimates() -> None:
    flops, moved, _ = op_work("expert_ffn_bmm", TINY, 8, "bf16")
    assert flops == 6 * 2 * 8 * 64 * 32  # 3 GEMMs of 2*T*D*F per expert
    assert moved >= 2 * 3 * 2 * 64 * 32  # at least the bf16 weights
    assert op_work("memcpy", TINY, 8, "fp32")[1] == 2 * 4 * 8 * 64  # read + write


def test_default_configs_take_shapes_from_presets() -> None:
    full = default_config("cpu")
    assert full.tokens == SWEEP_TOKENS and SWEEP_TOKENS[0] == 1 and SWEEP_TOKENS[-1] == 16384
    assert [s.model for s in full.shapes] == list(CPU_MODELS)
    by = {s.model: s for s in full.shapes}
    assert (by["FLAME-MoE-290M"].d_model, by["FLAME-MoE-290M"].d_ff) == (1024, 704)
    assert (by["OLMoE-1B-7B"].d_model, by["OLMoE-1B-7B"].d_ff) == (2048, 1024)
    assert (by["Mixtral-8x7B"].d_model, by["Mixtral-8x7B"].d_ff) == (4096, 14336)
    assert len(CPU_MODELS) == 8 and {"DeepSeek-V2", "Qwen2-57B-A14B"} <= set(by)
    ds = by["DeepSeek-V3"]
    assert (ds.d_model, ds.d_ff, ds.router_score, ds.kv_lora_rank, ds.head_dim) == (
        7168,
        2048,
        "sigmoid",
        512,
        192,
    )
    assert full.dtypes == ("fp32", "bf16")
    quick = default_config("cpu", quick=True)
    assert len(quick.shapes) == 1 and len(quick.tokens) <= 3 and quick.quick
    assert default_config("cuda").dtypes == ("bf16", "fp8")


def test_write_load_and_merge(tiny_result, tmp_path: Path) -> None:
    files = write_results(tiny_result, tmp_path)
    folder = tmp_path / tiny_result.meta["device_slug"]
    assert sorted(p.name for p in files) == sorted([f"{op}.csv" for op in OPS] + ["meta.json"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in files
    )  # no temp files
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"] == len(tiny_result.rows) and meta["config"]["tokens"] == [1, 8]
    table = load_table(folder)
    assert len(table) == len(tiny_result.rows)
    assert table["tokens"].dtype == "int64" and table["median_us"].dtype == "float64"
    assert set(load_table(folder, ops=["memcpy"])["op"]) == {"memcpy"}
    # a second run with another token count is merged in; the same key is replaced
    again = run_bench(tiny_config(ops=("memcpy",), dtypes=("fp32",), tokens=(8, 16)))
    write_results(again, tmp_path)
    memcpy = load_table(folder, ops=["memcpy"])
    fp32 = memcpy[memcpy["dtype"] == "fp32"].sort_values("tokens")
    assert list(fp32["tokens"]) == [1, 8, 16]
    new8 = again.rows[again.rows["tokens"] == 8]["median_us"].iloc[0]
    assert fp32[fp32["tokens"] == 8]["median_us"].iloc[0] == pytest.approx(new8, rel=1e-5)
    assert len(memcpy[memcpy["dtype"] == "bf16"]) == 2  # untouched


def test_merge_rows_replaces_same_key(tiny_result) -> None:
    rows = tiny_result.rows
    changed = rows.head(1).copy()
    changed["median_us"] = changed["p90_us"]
    merged = merge_rows(rows, changed)
    assert len(merged) == len(rows)
    key = merged[
        (merged["op"] == changed["op"].iloc[0]) & (merged["tokens"] == changed["tokens"].iloc[0])
    ]
    assert changed["median_us"].iloc[0] in set(key["median_us"])


# ----- loader validation -------------------------------------------------------------------------
@pytest.fixture
def table_dir(tiny_result, tmp_path: Path) -> Path:
    write_results(tiny_result, tmp_path)
    return tmp_path / tiny_result.meta["device_slug"]


def _edit(path: Path, fn) -> None:
    fn(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


LOADER_ERRORS = [
    # (edit of memcpy.csv, column named, value named, message)
    (lambda df: df.drop(columns=["p90_us"]), "p90_us", "(missing)", "missing column"),
    (lambda df: df.assign(median_us="fast"), "median_us", "fast", "not a finite"),
    (lambda df: df.assign(p10_us="-1.5"), "p10_us", "-1.5", "negative"),
    (lambda df: df.assign(tokens=""), "tokens", "", "not a finite"),
    (lambda df: df.assign(tokens="2.5"), "tokens", "2.5", "not an integer"),
    (lambda df: df.assign(min_us="inf"), "min_us", "inf", "not a finite"),
    (lambda df: df.assign(op="router"), "op", "router", "must have op"),
    (lambda df: df.assign(p10_us="1e9"), "median_us", None, "p10_us <= median"),
]


@pytest.mark.parametrize(("edit", "column", "value", "message"), LOADER_ERRORS)
def test_loader_errors_name_file_column_value(
    table_dir: Path, edit, column, value, message
) -> None:
    path = table_dir / "memcpy.csv"
    _edit(path, edit)
    with pytest.raises(InputError, match=message) as err:
        load_table(table_dir)
    text = str(err.value)
    assert str(path) in text and f"field '{column}'" in text and "\n" not in text
    if value is not None:
        assert repr(value) in text


def test_loader_missing_folder_or_tables(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such kernel-table folder"):
        load_table(tmp_path / "nope")
    with pytest.raises(InputError, match=r"no <op>\.csv"):
        load_table(tmp_path)
    (tmp_path / "router.csv").write_text("")
    with pytest.raises(InputError, match="not a readable CSV"):
        load_table(tmp_path)
    with pytest.raises(InputError, match="table not found"):
        load_table(tmp_path, ops=["memcpy"])


def test_bench_refuses_to_merge_into_a_corrupt_table(table_dir: Path, tiny_result) -> None:
    _edit(table_dir / "router.csv", lambda df: df.assign(median_us="x"))
    with pytest.raises(InputError, match=r"router\.csv"):
        write_results(tiny_result, table_dir.parent)


def test_device_slug() -> None:
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"
    assert device_slug("  ") == "unknown-device"


# ----- command line ------------------------------------------------------------------------------
def test_cli_bench_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import moesim.kernels.bench as bench
    from moesim.cli import app

    monkeypatch.setattr(
        bench, "default_config", lambda *a, **kw: tiny_config(ops=("router", "memcpy"))
    )
    result = CliRunner().invoke(
        app, ["kernels", "bench", "--quick", "--json", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"] == 8 and data["threads"] == 1 and data["quick"] is True
    assert {Path(f).name for f in data["files"]} == {"router.csv", "memcpy.csv", "meta.json"}
    assert len(load_table(data["device_dir"])) == 8
    table = CliRunner().invoke(app, ["kernels", "bench", "--out", str(tmp_path)])
    assert table.exit_code == 0 and "memcpy" in table.stdout and "8 points" in table.stdout


def test_cli_bench_cuda_without_gpu_is_input_error(tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from moesim.cli import app

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = CliRunner().invoke(
        app, ["kernels", "bench", "--device", "cuda", "--out", str(tmp_path)]
    )
    assert isinstance(result.exception, InputError)  # main() turns it into exit status 2
    assert "no CUDA device" in str(result.exception) and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_quick_bench_end_to_end(tmp_path: Path) -> None:
    """The real ``moesim kernels bench --quick`` (about 10 s on 2 idle cores)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moesim",
            "kernels",
            "bench",
            "--quick",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    table = load_table(data["device_dir"])
    assert set(table["op"]) == set(OPS) and set(table["model"]) == {"FLAME-MoE-290M"}


@pytest.mark.gpu
def test_cuda_quick_bench(tmp_path: Path) -> None:
    """bf16 and fp8 on a CUDA device (deselected by default; run with -m gpu)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = replace(default_config("cuda", quick=True), tokens=(1, 64))
    result = run_bench(cfg)
    assert set(result.rows["dtype"]) >= {"bf16"}
    assert (result.rows["median_us"] > 0).all()
    write_results(result, tmp_path)
    assert len(load_table(tmp_path / result.meta["device_slug"])) == len(result.rows)


def test_op_work_array_matches_op_work():
    """The vectorised work estimate (what the cost model's roofline uses for many token
    counts at once) gives exactly the scalar one's figures."""
    from moesim.costs.work import op_work_array

    tokens = np.array([1.0, 3.0, 64.0, 4096.0])
    for op in ("router", "permute", "unpermute", "expert_ffn_grouped", "attention", "memcpy"):
        for dtype in ("fp32", "bf16"):
            flops, moved = op_work_array(op, TINY, tokens, dtype)
            expected = np.array([op_work(op, TINY, int(t), dtype)[:2] for t in tokens])
            np.testing.assert_array_equal(flops, expected[:, 0])
            np.testing.assert_array_equal(moved, expected[:, 1])


def test_rounds_pool_calls_and_take_the_median_of_round_medians(monkeypatch) -> None:
    """Each point is measured once per round; ``median_us`` is the median of the rounds'
    medians and ``repeats`` counts every call (the per-round share of min/max repeats)."""
    import moesim.kernels.bench as bench

    fake = iter(float(x) for x in range(1, 10_000))
    real = bench._measure

    def measure(fn, cfg, torch):
        times, warm = real(fn, cfg, torch)
        return np.array([next(fake) for _ in times]), warm

    monkeypatch.setattr(bench, "_measure", measure)
    cfg = tiny_config(ops=("memcpy",), dtypes=("fp32",), rounds=3, min_repeats=6, max_repeats=6)
    rows = run_bench(cfg).rows
    assert len(rows) == 2 and (rows["rounds"] == 3).all()
    assert (rows["repeats"] == 6).all()  # 2 calls in each of 3 rounds
    # rounds run the whole sweep in turn: tokens 1 then 8, three times, so the calls of
    # tokens=1 are 1-2, 5-6, 9-10 (medians 1.5, 5.5, 9.5) and of tokens=8 3-4, 7-8, 11-12
    one, eight = rows.sort_values("tokens")["median_us"].tolist()
    assert one == 5.5 and eight == 7.5
    assert rows.sort_values("tokens")["min_us"].tolist() == [1.0, 3.0]


def test_rounds_place_inputs_differently() -> None:
    """Rounds after a multi-round run's first draw seeded pads before each input."""
    import torch

    from moesim.kernels.bench import _Ctx

    def pads(round_index: int) -> list[int]:
        ctx = _Ctx(
            torch=torch,
            device="cpu",
            dtype=torch.float32,
            gen=torch.Generator().manual_seed(0),
            layout=np.random.default_rng([0, round_index]),
        )
        for _ in range(4):
            ctx.randn(8, 8)
        return [p.numel() for p in ctx.pads]

    assert pads(1) == pads(1) and pads(1) != pads(2)
    assert all(n % 64 == 0 and n < 65536 for n in pads(0) + pads(3))
