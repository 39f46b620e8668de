"""Import of torch.profiler (Kineto) traces: linking, shapes, classes, bad input, CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from moesim.errors import InputError
from moesim.kernels.profile_import import (
    KERNEL_CLASSES,
    KERNEL_COLUMNS,
    classify_kernel,
    import_profile,
    kernel_base_name,
    write_kernel_csv,
)
from tests.conftest import run_moesim as _moesim

DEEPSEEK_TRACE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "deepseek_profile_data_train_ep64_h800.json"
)


# ----- a tiny synthetic Kineto trace ------------------------------------------------------------
def _x(
    cat: str, name: str, ts: float, dur: float, pid: object = 1, tid: object = 1, **args: object
) -> dict:
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "pid": pid,
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


def synthetic_trace() -> dict:
    """Two threads; nested CPU ops with shapes; kernels launched by runtime/driver calls."""
    ev = [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "python"}},
        # thread 1: aten::linear > aten::matmul > aten::mm (only linear and mm record shapes)
        _x(
            "cpu_op",
            "aten::linear",
            100,
            50,
            **{"Input Dims": [[8, 64], [32, 64]], "Input type": ["float", "float"]},
        ),
        _x("cpu_op", "aten::matmul", 105, 40),
        _x(
            "cpu_op",
            "aten::mm",
            110,
            30,
            **{"Input Dims": [[8, 64], [64, 32]], "Input type": ["float", "float"]},
        ),
        _x("cuda_runtime", "cudaLaunchKernel", 120, 5, correlation=7),
        # a user annotation around an NCCL all-to-all: the annotation gives the direction
        _x("user_annotation", "moe_combine", 200, 100),
        _x("cpu_op", "c10d::alltoall_base_", 210, 50, **{"Input Dims": [[16, 64], [16, 64]]}),
        _x("Runtime", "cudaLaunchKernel", 220, 5, **{"correlation id": 8}),
        # an NCCL all-to-all without an annotation on thread 2 (old-style categories)
        _x("Operator", "c10d::alltoall_base_", 400, 40, tid=2),
        _x("cuda_driver", "cuLaunchKernel", 410, 3, tid=2, correlation=9),
        # a DeepEP kernel launched outside any CPU op
        _x("cuda_runtime", "cudaLaunchKernelExC", 500, 2, correlation=10),
        # GPU side (pid 0): "kernel" and "Kernel" categories
        _x(
            "kernel",
            "ampere_sgemm_32x32_sliced1x4_tn",
            130,
            12.5,
            pid=0,
            tid=7,
            stream=7,
            correlation=7,
            grid=[4, 1, 1],
            block=[128, 1, 1],
        ),
        _x(
            "Kernel",
            "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)",
            240,
            80,
            pid=0,
            tid=20,
            stream=20,
            **{"correlation id": 8},
        ),
        _x(
            "kernel",
            "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t",
            420,
            60,
            pid=0,
            tid=20,
            stream=20,
            correlation=9,
        ),
        _x(
            "kernel",
            "void deep_ep::internode::dispatch<false, 8>(int4*, float*)",
            510,
            300,
            pid=0,
            tid=27,
            stream=27,
            correlation=10,
        ),
        # a kernel whose launch is not in the trace
        _x(
            "kernel",
            "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>(Flash_fwd_params)",
            900,
            40,
            pid=0,
            tid=7,
            stream=7,
            correlation=99,
        ),
    ]
    return {
        "schemaVersion": 1,
        "deviceProperties": [{"id": 0, "name": "NVIDIA Test GPU"}],
        "traceEvents": ev,
    }


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(synthetic_trace()))
    return path


def test_synthetic_trace_links_kernels_to_ops_and_shapes(trace_file: Path) -> None:
    s = import_profile(trace_file)
    k = s.kernels
    assert list(k.columns) == list(KERNEL_COLUMNS)
    assert s.num_kernels == 5 and s.devices == ("NVIDIA Test GPU",)
    assert k["ts_us"].is_monotonic_increasing
    gemm = k.iloc[0]
    assert gemm["class"] == "other" and gemm["dur_us"] == 12.5 and gemm["stream"] == 7
    assert (gemm["grid"], gemm["block"], gemm["launch"]) == ("4,1,1", "128,1,1", "cudaLaunchKernel")
    # innermost op with recorded shapes: aten::mm, not aten::matmul (no shapes) or aten::linear
    assert gemm["cpu_op"] == "aten::mm"
    assert json.loads(gemm["input_dims"]) == [[8, 64], [64, 32]]
    assert json.loads(gemm["input_types"]) == ["float", "float"]
    nccl_annotated = k.iloc[1]
    assert nccl_annotated["class"] == "combine"  # from the 'moe_combine' annotation
    assert nccl_annotated["annotation"] == "moe_combine"
    assert nccl_annotated["cpu_op"] == "c10d::alltoall_base_"
    assert json.loads(nccl_annotated["input_dims"]) == [[16, 64], [16, 64]]
    nccl_plain = k.iloc[2]
    assert nccl_plain["class"] == "all_to_all" and nccl_plain["launch"] == "cuLaunchKernel"
    assert nccl_plain["cpu_op"] == "c10d::alltoall_base_" and nccl_plain["input_dims"] == ""
    deepep = k.iloc[3]
    assert deepep["class"] == "dispatch" and deepep["cpu_op"] == "" and deepep["launch"] != ""
    unlinked = k.iloc[4]
    assert (
        unlinked["class"] == "attention"
        and unlinked["launch"] == ""
        and unlinked["correlation"] == 99
    )
    assert s.linked == 4 and s.with_input_dims == 2


def test_python_function_context_uses_function_name_only(tmp_path: Path) -> None:
    """A file path such as token_dispatcher.py must not make a combine look like a dispatch."""
    nccl = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"
    events = [
        _x("python_function", "megatron/moe/token_dispatcher.py(10): token_unpermutation", 0, 90),
        _x("python_function", "megatron/moe/token_dispatcher.py(20): combine_tokens", 100, 90),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 2, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 110, 2, correlation=2),
        _x("kernel", nccl, 20, 50, pid=0, tid=9, stream=9, correlation=1),
        _x("kernel", nccl, 120, 50, pid=0, tid=9, stream=9, correlation=2),
    ]
    path = tmp_path / "py.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert list(import_profile(path).kernels["class"]) == ["all_to_all", "combine"]


def test_summary_per_class_and_json(trace_file: Path) -> None:
    s = import_profile(trace_file)
    data = s.to_json()
    assert [c["class"] for c in data["classes"]] == [
        c
        for c in KERNEL_CLASSES
        if c in {"combine", "all_to_all", "dispatch", "attention", "other"}
    ]
    assert set(data["classes"][0]) == {"class", "count", "median_us", "total_us"}
    assert data["kernels"] == 5 and data["trace"] == str(trace_file)
    a2a = next(c for c in data["classes"] if c["class"] == "all_to_all")
    assert a2a == {"class": "all_to_all", "count": 1, "median_us": 60.0, "total_us": 60.0}
    json.dumps(data)  # plain JSON types only


def test_gzip_trace_reads_the_same(trace_file: Path, tmp_path: Path) -> None:
    gz = tmp_path / "trace.json.gz"
    gz.write_bytes(gzip.compress(trace_file.read_bytes()))
    pd.testing.assert_frame_equal(import_profile(gz).kernels, import_profile(trace_file).kernels)


def test_kernel_csv_is_written_atomically(trace_file: Path, tmp_path: Path) -> None:
    out = write_kernel_csv(import_profile(trace_file), tmp_path / "sub" / "kernels.csv")
    back = pd.read_csv(out, keep_default_na=False)
    assert list(back.columns) == list(KERNEL_COLUMNS) and len(back) == 5
    assert [p.name for p in out.parent.iterdir()] == ["kernels.csv"]  # no temporary left


# ----- classification rules ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "context", "expected"),
    [
        # DeepEP (names as in the DeepSeek-V3 profile and DeepEP's sources)
        ("void dpsk::ep::internode::dispatch<false, 8, true, 8>(int4*, float*)", (), "dispatch"),
        ("void deep_ep::intranode::dispatch<8, 768, 8192>(int4*, float*)", (), "dispatch"),
        ("void deep_ep::internode_ll::dispatch<false, 3, 7168>(void*)", (), "dispatch"),
        (
            "void dpsk::ep::internode::combine<false, 8, __nv_bfloat16, 8, 2, 16, 24>(int4*)",
            (),
            "combine",
        ),
        ("void deep_ep::internode_ll::combine<3, 7168, 128>(void*)", (), "combine"),
        (
            "void dpsk::ep::internode::notify_dispatch<false, 8>(int const*, long*)",
            (),
            "ep_control",
        ),
        ("void dpsk::ep::internode::cached_notify<false>(int, int)", (), "ep_control"),
        (
            "void dpsk::ep::cuda::get_dispatch_layout<256, 32, 8>(long const*, int*)",
            (),
            "ep_control",
        ),
        ("void deep_ep::intranode::cached_notify_combine<8>(void**, int*)", (), "ep_control"),
        ("void deep_ep::intranode::notify_combine(int*)", (), "ep_control"),
        ("void deep_ep::internode_ll::clean_low_latency_buffer<32>(int*, int)", (), "ep_control"),
        # NCCL all-to-all: direction from the enclosing op/annotation, innermost first
        (
            "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)",
            ("c10d::alltoall", "dispatch(F)"),
            "dispatch",
        ),
        (
            "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)",
            ("moe_combine", "dispatch(F)"),
            "combine",
        ),
        ("ncclKernel_AllToAll_RING_LL(ncclWorkElem)", (), "all_to_all"),
        (
            "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
            ("dispatch",),
            "other",
        ),
        # grouped GEMMs
        (
            "void cutlass::device_kernel<dpsk::grouped_gemm::cuda::m_grouped_fp8_ptp128c::"
            "GemmKernel>(Params)",
            (),
            "grouped_gemm",
        ),
        ("void deep_gemm::fp8_gemm_kernel<7168, 2048, 128>(float*)", (), "grouped_gemm"),
        (
            "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<"
            "cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int>>>>(Params)",
            (),
            "grouped_gemm",
        ),
        (
            "void dpsk::grouped_gemm::cuda::utils::transpose<512, 128, 4, 4>(unsigned char const*)",
            (),
            "other",
        ),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x128x64_cublas", (), "other"),
        # attention, including a split-KV "combine" kernel that is not an all-to-all
        ("void flash::compute_attn_ws<Flash_fwd_kernel_traits<192, 128>>(Params)", (), "attention"),
        (
            "void flash_fwd_splitkv_combine_kernel<Flash_fwd_kernel_traits>(Flash_fwd_params)",
            (),
            "attention",
        ),
        (
            "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)",
            (),
            "attention",
        ),
        (
            "void flash_mla::flash_fwd_splitkv_mla_kernel<cutlass::bfloat16_t>(Params)",
            (),
            "attention",
        ),
        ("void mla_decode_kernel<128>(float*)", (), "attention"),
        # ordinary torch kernels
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>()",
            (),
            "other",
        ),
        ("void (anonymous namespace)::elementwise_kernel_with_index<int>(int)", (), "other"),
    ],
)
def test_classify_kernel(name: str, context: tuple[str, ...], expected: str) -> None:
    assert classify_kernel(name, context) == expected


def test_kernel_base_name() -> None:
    assert kernel_base_name("void dpsk::ep::internode::dispatch<false, 8>(int4*)") == "dispatch"
    assert kernel_base_name("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == (
        "ncclDevKernel_SendRecv"
    )
    assert kernel_base_name("void (anonymous namespace)::foo<int>(int)") == "foo"
    assert kernel_base_name("rotary_kernel") == "rotary_kernel"


# ----- the real DeepSeek-V3 H800 training profile -----------------------------------------------
@pytest.mark.skipif(not DEEPSEEK_TRACE.is_file(), reason="shared DeepSeek profile not present")
def test_real_deepseek_v3_profile() -> None:
    s = import_profile(DEEPSEEK_TRACE)
    assert s.num_kernels == 963 and s.linked == 963
    assert s.devices == ("NVIDIA H800",)
    classes = s.classes.set_index("class")
    # data README: internode dispatch 3.1-4.6 ms, combine 5.8-6.5 ms per call
    assert classes.loc["dispatch", "count"] == 8 and classes.loc["combine", "count"] == 8
    assert classes.loc["dispatch", "median_us"] == pytest.approx(3883.5)
    assert classes.loc["combine", "median_us"] == pytest.approx(6063.0)
    k = s.kernels
    disp = k.loc[k["class"] == "dispatch", "dur_us"]
    comb = k.loc[k["class"] == "combine", "dur_us"]
    assert disp.min() >= 3100 and disp.max() <= 4610
    assert comb.min() >= 5800 and comb.max() <= 6550
    # all DeepEP kernels run on the communication stream 27
    assert set(k.loc[k["class"].isin(["dispatch", "combine", "ep_control"]), "stream"]) == {27}
    # notify_dispatch 1.4-3.6 ms
    notify = k.loc[k["name"].str.contains("notify_dispatch"), "dur_us"]
    assert len(notify) == 4 and notify.min() >= 1380 and notify.max() <= 3600
    assert classes.loc["ep_control", "count"] == 20
    assert classes.loc["grouped_gemm", "count"] == 140
    assert classes.loc["attention", "count"] == 16
    # the backward of combine moves tokens like a dispatch: DeepEP runs its dispatch kernel
    assert set(k.loc[k["class"] == "dispatch", "annotation"]) == {"dispatch(F)", "combine(B)"}


# ----- a real torch.profiler export on CPU --------------------------------------------------------
def test_real_cpu_profiler_trace_has_no_kernels(tmp_path: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        (x @ x).softmax(dim=-1)
    path = tmp_path / "cpu_trace.json"
    prof.export_chrome_trace(str(path))
    data = json.loads(path.read_text())
    assert any(
        e.get("cat") == "cpu_op" and "Input Dims" in e.get("args", {}) for e in data["traceEvents"]
    )
    with pytest.raises(InputError, match="no GPU kernel events") as err:
        import_profile(path)
    assert str(path) in str(err.value) and "ProfilerActivity.CUDA" in str(err.value)


# ----- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_name_file_and_field(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes, str]] = {
        "notjson.json": (b"hello", "not valid JSON"),
        "binary.json": (b"\xff\xfe\x00garbage", "JSON"),
        "list.json": (b"[1, 2]", "traceEvents"),
        "nokey.json": (b'{"schemaVersion": 1}', "traceEvents"),
        "notlist.json": (b'{"traceEvents": {"a": 1}}', "traceEvents"),
        "corrupt.json.gz": (b"\x1f\x8b\x08\x00\x00\x00garbage", "corrupt gzip"),
        "truncated.json.gz": (gzip.compress(json.dumps(synthetic_trace()).encode())[:200], "gzip"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=needle) as err:
            import_profile(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="file not found"):
        import_profile(tmp_path / "missing.json")
    with pytest.raises(InputError, match="not a file"):
        import_profile(tmp_path)


def test_kernel_with_bad_duration(tmp_path: Path) -> None:
    data = synthetic_trace()
    kernel_index = next(i for i, e in enumerate(data["traceEvents"]) if e.get("cat") == "kernel")
    data["traceEvents"][kernel_index]["dur"] = "soon"
    path = tmp_path / "bad_dur.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        import_profile(path)
    assert f"traceEvents[{kernel_index}].dur" in str(err.value) and "'soon'" in str(err.value)


# ----- command line ------------------------------------------------------------------------------
def test_cli_json_and_csv(trace_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.csv"
    proc = _moesim("kernels", "import-profile", str(trace_file), "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"classes", "kernels", "trace"} <= set(data)
    assert data["kernels"] == 5 and data["trace"] == str(trace_file)
    assert len(pd.read_csv(out)) == 5


def test_cli_table(trace_file: Path) -> None:
    from typer.testing import CliRunner

    from moesim.cli import app

    result = CliRunner().invoke(app, ["kernels", "import-profile", str(trace_file)])
    assert result.exit_code == 0, result.output
    for needle in ("all_to_all", "combine", "5 kernels, 4 linked", "2 with input shapes"):
        assert needle in result.output


def test_cli_bad_trace_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"traceEvents": []}')
    proc = _moesim("kernels", "import-profile", str(path))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert str(path) in err and "no GPU kernel events" in err


def test_non_finite_stream_is_refused_and_correlation_unlinks(tmp_path: Path) -> None:
    trace = synthetic_trace()
    kernels = [i for i, e in enumerate(trace["traceEvents"]) if e.get("cat") == "kernel"]
    trace["traceEvents"][kernels[0]]["args"]["correlation"] = float("inf")
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))  # writes Infinity, which Kineto readers accept
    s = import_profile(path)
    assert s.kernels.loc[s.kernels["name"].str.startswith("ampere"), "launch"].tolist() == [""]
    trace["traceEvents"][kernels[0]]["args"]["stream"] = float("nan")
    path.write_text(json.dumps(trace))
    with pytest.raises(InputError, match="stream must be a finite number") as err:
        import_profile(path)
    assert err.value.field == f"traceEvents[{kernels[0]}].args.stream"
