"""``moesim kernels bench``, ``moesim kernels import-profile``, ``moesim kernels predict``
and ``moesim calibrate``.

Registered in :mod:`moesim.cli`; torch is imported inside the commands only, so that
``moesim --help`` stays fast.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moesim.console import make_console, print_json, status
from moesim.errors import InputError
from moesim.fileio import check_writable
from moesim.paths import display_path
from moesim.scenario import load_scenario_with_hardware

__all__ = [
    "BenchDevice",
    "calibrate_cmd",
    "import_profile_cmd",
    "kernels_bench_cmd",
    "predict_cmd",
]

console = make_console()


class BenchDevice(str, Enum):
    """Where ``kernels bench`` runs."""

    cpu = "cpu"
    cuda = "cuda"


def _fmt_us(us: float) -> str:
    if us >= 1e3:
        return f"{us / 1e3:,.3f} ms"
    return f"{us:,.1f} µs"


def kernels_bench_cmd(
    device: Annotated[
        BenchDevice, typer.Option(help="Device to benchmark: cpu or cuda.")
    ] = BenchDevice.cpu,
    quick: Annotated[
        bool, typer.Option("--quick", help="A short subset (one model, 3 token counts).")
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Folder of measured tables; writes <out>/<device-slug>/.")
    ] = Path("kernels/measured"),
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Model preset to take shapes from (repeatable)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch.set_num_threads for the run (default: torch's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a summary as JSON.")] = False,
) -> None:
    """Benchmark the kernels of an MoE layer and write timing tables.

    Measures router, permute, expert FFN (loop, bmm, grouped_mm), unpermute,
    attention and memory copies over tokens 1..16384 for the shapes of model
    presets; merges median, p10 and p90 into <out>/<device-slug>/<op>.csv and
    writes meta.json. Schema: kernels/README.md.
    """
    from moesim.kernels.bench import (
        Device,
        check_existing,
        default_config,
        run_bench,
        write_results,
    )
    from moesim.model.shapes import get_preset

    for name in model or []:
        get_preset(name)  # unknown names fail before any work
    dev: Device = "cuda" if device is BenchDevice.cuda else "cpu"
    cfg = default_config(dev, quick=quick, models=model or None, threads=threads)
    err = make_console(stderr=True)
    folder = check_existing(out, dev)
    result = run_bench(cfg, progress=None if as_json else lambda msg: err.print(msg, markup=False))
    files = write_results(result, out)
    summary = {
        "device": result.meta["device"],
        "device_dir": str(folder),
        "torch_version": result.meta["torch_version"],
        "threads": result.meta["threads"],
        "quick": quick,
        "rows": len(result.rows),
        "skipped": len(result.skipped),
        "wall_s": round(result.wall_s, 3),
        "files": [str(f) for f in files],
    }
    if as_json:
        print_json(summary)
        return
    console = make_console()
    table = Table(
        "model",
        "op",
        "dtype",
        "points",
        "tokens",
        "median (fewest → most tokens)",
        title=str(folder),
    )
    rows = result.rows
    for (model_name, op, dtype), part in rows.groupby(["model", "op", "dtype"], sort=False):
        part = part.sort_values("tokens")
        table.add_row(
            str(model_name),
            str(op),
            str(dtype),
            str(len(part)),
            f"{int(part['tokens'].iloc[0])}..{int(part['tokens'].iloc[-1])}",
            f"{_fmt_us(float(part['median_us'].iloc[0]))} → "
            f"{_fmt_us(float(part['median_us'].iloc[-1]))}",
        )
    console.print(table)
    console.print(
        f"{len(rows)} points on {result.meta['device']} ({result.meta['threads']} threads, "
        f"torch {result.meta['torch_version']}), {len(result.skipped)} skipped "
        f"(see meta.json), in {result.wall_s:.1f} s"
    )


def import_profile_cmd(
    trace: Annotated[Path, typer.Argument(help="torch.profiler Chrome trace, .json or .json.gz.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Write the per-kernel table to this CSV file.")
    ] = None,
) -> None:
    """Summarise the GPU kernels of a torch.profiler trace per class.

    Classes: dispatch, combine (token all-to-all: DeepEP dispatch/combine,
    NCCL all-to-all), all_to_all (NCCL, direction unknown), ep_control
    (DeepEP notify/layout), grouped_gemm, attention, other. --json prints
    {"classes": [{"class", "count", "median_us", "total_us"}], "kernels",
    "trace", ...}; --out writes one CSV row per kernel.
    """
    from moesim.kernels.profile_import import import_profile, write_kernel_csv

    summary = import_profile(trace)
    written = write_kernel_csv(summary, out) if out is not None else None
    if as_json:
        data = summary.to_json()
        if written is not None:
            data["out"] = str(written)
        print_json(data)
        return
    console = make_console()
    total = float(summary.kernels["dur_us"].sum())
    table = Table(
        "class",
        "kernels",
        "median",
        "min",
        "max",
        "total",
        "share",
        title=f"{trace} ({', '.join(summary.devices) or 'device unknown'})",
    )
    by_class = summary.kernels.groupby("class")["dur_us"]
    for row in summary.classes.to_dict("records"):
        durs = by_class.get_group(row["class"])
        table.add_row(
            str(row["class"]),
            f"{int(row['count']):,}",
            _fmt_us(float(row["median_us"])),
            _fmt_us(float(durs.min())),
            _fmt_us(float(durs.max())),
            _fmt_us(float(row["total_us"])),
            f"{100 * float(row['total_us']) / total:.1f}%" if total > 0 else "-",
        )
    console.print(table)
    console.print(
        f"{summary.num_kernels:,} kernels, {summary.linked:,} linked to their launch, "
        f"{summary.with_input_dims:,} with input shapes"
        + (f"; wrote {written}" if written is not None else "")
    )


def predict_cmd(
    hardware: Annotated[str, typer.Option(help="Hardware profile: a name or a .yaml file.")],
    model: Annotated[str, typer.Option(help="Model preset, e.g. DeepSeek-V3.")],
    op: Annotated[
        str,
        typer.Option(
            help="expert_ffn | attention | attention_scores | router | shared_experts | "
            "permute | unpermute."
        ),
    ],
    dtype: Annotated[str, typer.Option(help="bf16 | fp8 (the compute dtype).")] = "bf16",
    tokens_per_expert: Annotated[
        int | None, typer.Option(help="expert_ffn: rows each expert gets.")
    ] = None,
    experts: Annotated[int | None, typer.Option(help="expert_ffn: experts in the call.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Other ops: tokens on the device.")] = None,
    sequence_length: Annotated[
        int, typer.Option(help="Attention: tokens per sequence (causal).")
    ] = 4096,
    mode: Annotated[str, typer.Option(help="training | prefill | decode.")] = "prefill",
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """What the simulator believes one kernel takes, on the profile's cost model.

    expert_ffn: G experts' full FFN (gate+up and down) at M rows each, one grouped call,
    timed as a simulation's experts phase times it. --json prints {"time_us": ...} with
    the inputs.
    """
    from moesim.costs.predict import predict_op
    from moesim.errors import InputError
    from moesim.hardware import get_profile
    from moesim.model.shapes import get_preset

    for name, value, valid in (
        ("dtype", dtype, ("bf16", "fp8")),
        ("mode", mode, ("training", "prefill", "decode")),
    ):
        if value not in valid:
            raise InputError(f"valid: {', '.join(valid)}", field=name, value=value)
    res = predict_op(
        op,
        get_profile(hardware),
        get_preset(model),
        dtype=dtype,
        tokens_per_expert=tokens_per_expert,
        experts=experts,
        tokens=tokens,
        sequence_length=sequence_length,
        mode=mode,
    )
    if as_json:
        print_json(res)
        return
    inputs = ", ".join(f"{k} {v}" for k, v in res.items() if k not in ("op", "time_us"))
    make_console().print(f"{op}: {_fmt_us(res['time_us'])} ({inputs})")


def calibrate_cmd(
    profile: Annotated[Path, typer.Option(help="torch.profiler (Kineto) trace, .json[.gz].")],
    hardware: Annotated[str, typer.Option(help="The profile to derive from: a name or file.")],
    scenario: Annotated[Path, typer.Option(help="The scenario whose configuration it ran.")],
    out: Annotated[Path, typer.Option(help="Where to write the derived profile (.yaml).")],
    fit_layers: Annotated[
        str | None,
        typer.Option(help="Trace layers to fit on, e.g. 0,1 (default: the first half)."),
    ] = None,
    rank: Annotated[int, typer.Option(help="The rank the trace was recorded on.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Fit a hardware profile's factors to a profiler trace of the scenario's run.

    Fits GEMM efficiency, the expert backward factor, attention efficiency, the compute
    slowdown beside communication and the all-to-alls' floor and bandwidth on the trace's
    fit layers, writes the derived profile (with the trace's sha256 and what changed), and
    prints each kernel class's error on the other layers before and after. Simulate with
    it: moesim simulate SCENARIO --hardware OUT.yaml.
    """
    from moesim.fileio import atomic_write_text
    from moesim.hardware import get_profile
    from moesim.kernels.calibrate import calibrate_profile, prepare_for_calibration
    from moesim.yamlio import dump_yaml

    if not str(out).endswith((".yaml", ".yml")):
        raise InputError("the derived profile is a .yaml file", field="out", value=str(out))
    check_writable(out)
    layers = None
    if fit_layers is not None:
        try:
            layers = [int(x) for x in fit_layers.split(",") if x.strip()]
        except ValueError:
            raise InputError(
                "expected layers like 0,1", field="fit-layers", value=fit_layers
            ) from None
    sc, base = load_scenario_with_hardware(scenario, hardware)
    prep = prepare_for_calibration(sc, base, display_path(scenario))
    hw = get_profile(sc.hardware)
    with status(f"calibrating {sc.hardware} to {profile.name}"):
        res = calibrate_profile(profile, hw, prep, fit_layers=layers, rank=rank)
    data = res.profile.model_dump(exclude_none=True, mode="json")
    atomic_write_text(out, dump_yaml(data))
    if as_json:
        print_json(res.to_json() | {"out": str(out)})
        return
    console.print(
        f"{res.profile.name}: fitted on layers {res.fit_layers} of {profile.name}, "
        f"held out {res.test_layers}"
    )
    for key, (old, new) in res.changed.items():
        console.print(f"  {key}: {old} -> {new}")
    for note in res.notes:
        console.print(f"  not fitted: {note}")
    console.print("error per class on the held-out layers (median |predicted / measured - 1|):")
    after = {str(r["class"]): r for r in res.after.to_dict("records")}
    for b in res.before.to_dict("records"):
        a = after[str(b["class"])]
        console.print(
            f"  {b['class']:22s} measured {float(b['measured_us']):9.1f} us  before "
            f"{float(b['predicted_us']):9.1f} us ({100 * float(b['error']):5.1f}%)  after "
            f"{float(a['predicted_us']):9.1f} us ({100 * float(a['error']):5.1f}%)"
        )
    before, after_err = res.before["error"], res.after["error"]
    console.print(
        f"median over classes: {100 * before.median():.1f}% before, "
        f"{100 * after_err.median():.1f}% after (worst {100 * after_err.max():.1f}%); wrote {out}"
    )
