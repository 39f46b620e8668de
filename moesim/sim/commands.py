"""CLI commands: ``moesim demo``, ``moesim simulate`` and ``moesim a2a``.

Registered in :mod:`moesim.cli`; the simulator is imported when a command runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from moesim.console import make_console, print_json, progress_bar, status
from moesim.errors import InputError
from moesim.fileio import check_output_folder
from moesim.options import ForceOption
from moesim.paths import display_path
from moesim.scenario import FLOW_REL_TOL, load_scenario_with_hardware

__all__ = ["a2a_cmd", "demo_cmd", "demo_comparison", "simulate_cmd"]

console = make_console()


def _run_scenario(
    path: Path,
    out: Path,
    as_json: bool,
    quiet: bool = False,
    strict: bool = False,
    hardware: str | None = None,
    force: bool = False,
) -> None:
    t0 = time.perf_counter()
    check_output_folder(out, "run", force=force)  # before any work
    from moesim.report import write_outputs
    from moesim.report.summary import console_summary
    from moesim.sim.prepare import prepare
    from moesim.sim.simulate import routed_layer_steps, simulate_prepared

    scenario, base = load_scenario_with_hardware(path, hardware)
    source = display_path(path)
    with status("preparing: routing, placement, costs"):
        prep = prepare(scenario, base, source)
    with progress_bar("simulate", routed_layer_steps(prep), "layer steps") as advance:
        result = simulate_prepared(prep, source, progress=advance)
    files = write_outputs(result, out, force=force)
    if as_json:
        runs = [r.summary for r in result.runs]
        print_json(runs[0] | {"runs": runs, "outputs": {k: str(v) for k, v in files.items()}})
    elif not quiet:
        console.print(console_summary(result), markup=False)
        console.print(
            f"\nwrote {', '.join(str(p) for p in files.values())} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    if strict:
        _check_fits(result, display_path(path), out)


def _check_fits(result: Any, source: Path, out: Path) -> None:
    """``--strict``: a mode whose memory per device exceeds HBM is an error (exit 2); the
    outputs, already written whole, stay for inspection."""
    for run in result.runs:
        s = run.summary
        if not s.get("memory_fits", True):
            raise InputError(
                f"{s['mode']} needs {s['memory_per_device_bytes'] / 1e9:.1f} GB per device, "
                f"more than the {s['hbm_bytes'] / 1e9:.1f} GB of HBM (--strict; outputs "
                f"written to {out})",
                file=source,
                field="hardware",
                value=result.scenario.hardware,
            )


def _demo_baseline(scenario: Any) -> Any:
    """The demo's comparison: the same scenario with Megatron's contiguous placement."""
    return scenario.model_copy(update={"placement": "contiguous", "redundant_slots": 0})


def demo_comparison(planned: Any, baseline: Any) -> list[str]:
    """The demo's side-by-side lines: per mode, both step times and the difference, then
    each placement's worst-layer routed balance and straggler with its cause."""
    sc = planned.scenario
    name = f"{sc.placement}" + (f" + {sc.redundant_slots} redundant" if sc.redundant_slots else "")
    lines = [f"Placement: contiguous (Megatron default) vs {name} (planned from the trace)"]
    for b, p in zip(baseline.runs, planned.runs, strict=True):
        tb, tp = b.summary["step_time_us"], p.summary["step_time_us"]
        lines.append(
            f"  [{p.mode}] step time {tb / 1e3:.3f} ms -> {tp / 1e3:.3f} ms "
            f"({tp - tb:+.1f} µs, {100 * (tp - tb) / tb:+.1f}%)"
        )
    for label, res in (("contiguous", baseline), (name, planned)):
        s = res.runs[0].summary
        worst = max(range(len(s["layers"])), key=lambda i: s["routed_balance"][i])
        lines.append(
            f"  {label}: worst routed balance {s['routed_balance'][worst]:.3f} (layer "
            f"{s['layers'][worst]}), straggler device {s['straggler_device'][worst]} "
            f"({s['straggler_cause'][worst]}, +{100 * s['straggler_penalty'][worst]:.1f}% "
            f"over the mean {s['straggler_phase'][worst]} time)"
        )
    return lines


def demo_cmd(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("reports/demo"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    force: ForceOption = False,
) -> None:
    """Run the bundled scenario (real routing of moesim's reference MoE on 2 x 8 H100,
    dropless) with a placement planned from the trace, and again with contiguous placement:
    both step times, the difference, each one's balance and straggler. Writes the planned
    run's report to OUT and the contiguous one's to OUT/contiguous."""
    from moesim.paths import scenarios_dir
    from moesim.report import write_outputs
    from moesim.report.summary import console_summary
    from moesim.report.write import run_files
    from moesim.scenario import load_scenario
    from moesim.sim.simulate import simulate

    t0 = time.perf_counter()
    check_output_folder(out, "run", force=force)  # before any work
    path = scenarios_dir() / "demo.yaml"
    scenario, base = load_scenario(path)
    source = display_path(path)
    planned = simulate(scenario, base, source=source)
    baseline = simulate(_demo_baseline(scenario), base, source=source)
    contiguous = {f"contiguous/{k}": v for k, v in run_files(baseline).items()}
    files = write_outputs(planned, out, force=force, extra=contiguous)
    if as_json:
        runs = [r.summary for r in planned.runs]
        print_json(
            runs[0]
            | {
                "runs": runs,
                "contiguous_runs": [r.summary for r in baseline.runs],
                "outputs": {k: str(v) for k, v in files.items()},
            }
        )
        return
    console.print(console_summary(planned), markup=False)
    console.print("\n" + "\n".join(demo_comparison(planned, baseline)), markup=False)
    console.print(
        f"\nwrote {', '.join(str(p) for p in files.values())} (contiguous: "
        f"{out / 'contiguous'}) in {time.perf_counter() - t0:.1f} s"
    )


def simulate_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit 2 when a mode does not fit in HBM (outputs are written first).",
        ),
    ] = False,
    hardware: Annotated[
        str | None,
        typer.Option(
            help="Hardware profile instead of the scenario's: a name, or a profile file "
            "such as one moesim calibrate wrote."
        ),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Simulate one scenario; writes report.html, summary.md, metrics.parquet and timeline.json.

    With --json, prints step_time_us, drop_rate and, per MoE layer, expert_balance,
    routed_balance, processed_balance, dropless_capacity_factor, straggler_device and
    straggler_cause of the first mode, and every mode under "runs". A run that does not
    fit in HBM is a warning, or with --strict an error (exit 2).
    """
    _run_scenario(scenario, out, as_json, strict=strict, hardware=hardware, force=force)


def a2a_cmd(
    hardware: Annotated[str, typer.Option(help="Hardware profile, e.g. H800.")],
    ep: Annotated[int, typer.Option(help="Expert-parallel ranks.")],
    tokens_per_rank: Annotated[int, typer.Option(help="Tokens each rank dispatches.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Model preset: its hidden size, top-k, experts and group limit (the "
            "options below override them)."
        ),
    ] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden size (elements per token).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per token.")] = None,
    num_experts: Annotated[int | None, typer.Option(help="Routed experts.")] = None,
    dispatcher: Annotated[
        str,
        typer.Option(
            help="auto | deepep-normal | deepep-low-latency | nccl-alltoallv | "
            "megatron-alltoall (auto: deepep-normal on NVIDIA GPUs from Hopper on, "
            "nccl-alltoallv else)."
        ),
    ] = "auto",
    dispatch_dtype: Annotated[
        str | None, typer.Option(help="fp8 | bf16 (default: the dispatcher's).")
    ] = None,
    combine_dtype: Annotated[
        str | None, typer.Option(help="bf16 | fp8 (default: the dispatcher's).")
    ] = None,
    dedup: Annotated[
        str | None, typer.Option(help="none | device | node (default: the dispatcher's).")
    ] = None,
    network: Annotated[str, typer.Option(help="analytic | flow.")] = "analytic",
    flow_rel_tol: Annotated[
        float, typer.Option(help="Flow tier: relative tolerance of its event batching (0: exact).")
    ] = FLOW_REL_TOL,
    seed: Annotated[int, typer.Option(help="Seed of the random routing.")] = 0,
    trace: Annotated[Path | None, typer.Option(help="Route from this trace instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Time one all-to-all dispatch and combine, to hold against measured numbers.

    Tokens are routed uniformly at random (within the model's group limit, DeepSeek-V3's
    4 of 8 groups, when --model names one that has it) or from --trace, experts placed
    contiguously, devices per node taken from the profile; copies, dtypes and the fixed
    cost of each call are the dispatcher's.
    """
    from moesim.dispatchers import PRESETS, Dedup, Wire
    from moesim.model.shapes import get_preset
    from moesim.sim.a2a import run_a2a
    from moesim.sim.exchange import Tier

    for name, value, valid in (
        ("dispatcher", dispatcher, ("auto", *PRESETS)),
        ("dispatch-dtype", dispatch_dtype, ("fp8", "bf16", None)),
        ("combine-dtype", combine_dtype, ("fp8", "bf16", None)),
        ("dedup", dedup, ("none", "device", "node", None)),
        ("network", network, ("analytic", "flow")),
    ):
        if value not in valid:
            raise InputError(f"valid: {', '.join(v for v in valid if v)}", field=name, value=value)
    shape = get_preset(model) if model is not None else None
    given = {"hidden": hidden, "top-k": top_k, "num-experts": num_experts}
    if shape is not None:
        preset = {"hidden": shape.d_model, "top-k": shape.top_k, "num-experts": shape.num_experts}
        given = {key: preset[key] if v is None else v for key, v in given.items()}
    for key, v in given.items():
        if v is None:
            raise InputError("give it, or --model", field=key, value=None)
    h, k, e = (int(v or 0) for v in given.values())
    groups = shape.groups if shape is not None and e == shape.num_experts else None
    res = run_a2a(
        hardware=hardware,
        ep=ep,
        tokens_per_rank=tokens_per_rank,
        hidden=h,
        topk=k,
        num_experts=e,
        dispatcher=dispatcher,
        dispatch_dtype=cast(Wire | None, dispatch_dtype),
        combine_dtype=cast(Wire | None, combine_dtype),
        dedup=cast(Dedup | None, dedup),
        groups=groups,
        network=cast(Tier, network),
        flow_rel_tol=flow_rel_tol,
        seed=seed,
        trace=trace,
    )
    if as_json:
        print_json(res)
        return
    limit = f", within {groups[1]} of {groups[0]} groups" if groups else ""
    console.print(
        f"{res['hardware']} EP{ep} ({res['devices_per_node']}/node), {tokens_per_rank} "
        f"tokens/rank, hidden {h}, top-{k} of {e}{limit}; {res['dispatcher']}: dedup "
        f"{res['dedup']}, {res['dispatch_dtype']} dispatch, {res['combine_dtype']} combine, "
        f"{res['fixed_us']:.1f} us fixed per call; {network} network"
    )
    for phase in ("dispatch", "combine"):
        console.print(
            f"  {phase:8s} {res[f'{phase}_us']:10.1f} us  "
            f"{res[f'{phase}_bytes'] / 1e6:9.2f} MB moved  "
            f"scale-up {res[f'{phase}_scale_up_gbps']:6.1f} GB/s  "
            f"scale-out {res[f'{phase}_scale_out_gbps']:6.1f} GB/s (busiest rank)"
        )
