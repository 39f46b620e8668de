"""The ``moesim`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.table import Table

from moesim import __version__
from moesim.console import make_console, print_json, progress_bar, status
from moesim.errors import InputError
from moesim.fileio import check_output_folder, check_writable
from moesim.options import ForceOption
from moesim.paths import display_path
from moesim.scenario import FLOW_REL_TOL, load_scenario_with_hardware

__all__ = ["app", "main"]

app = typer.Typer(
    name="moesim",
    help=(
        "Simulate Mixture-of-Experts models on GPU/TPU clusters by replaying real routing "
        "traces through a discrete-event model of devices and links."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # a pipe or a file gets click's plain help: paragraphs re-wrapped, names never cut
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
)
hardware_app = typer.Typer(help="List and inspect hardware profiles.", no_args_is_help=True)
app.add_typer(hardware_app, name="hardware")
trace_app = typer.Typer(help="Import, synthesise and inspect routing traces.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")
kernels_app = typer.Typer(
    help="Kernel timings: benchmark kernels, import profiler traces, predict a kernel.",
    no_args_is_help=True,
)
app.add_typer(kernels_app, name="kernels")

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


@app.command()
def demo(
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


@app.command()
def init(
    out: Annotated[Path, typer.Argument(help="Scenario YAML file to write.")],
    model: Annotated[str, typer.Option(help="A model preset (moesim models) or model YAML.")],
    hardware: Annotated[
        str, typer.Option(help="A hardware profile (moesim hardware list) or profile YAML.")
    ],
    nodes: Annotated[int, typer.Option(min=1, help="Nodes in the cluster.")],
    devices_per_node: Annotated[
        int | None, typer.Option(min=1, help="Devices per node; default: the profile's.")
    ] = None,
    trace: Annotated[Path | None, typer.Option(help="Replay this routing trace folder.")] = None,
    synthetic: Annotated[
        str | None,
        typer.Option(help="Synthetic routing instead: uniform | zipf:S | dirichlet:A | ..."),
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option(help="training | prefill | decode; repeat for several (default training)."),
    ] = None,
    tokens_per_device: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens per device per layer step (decode: sequences per device); default: "
            "the trace's tokens spread over the devices, else 4096 (128 for decode).",
        ),
    ] = None,
    placement: Annotated[str, typer.Option(help="A planner or a placement YAML.")] = ("contiguous"),
    dispatcher: Annotated[str, typer.Option(help="A dispatcher preset, or auto.")] = "auto",
    seed: Annotated[int, typer.Option(min=0, help="The scenario's seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a commented scenario file that `moesim simulate` runs as it is.

    Give --trace to replay a routing trace, or --synthetic for seeded synthetic routing.
    """
    from moesim.fileio import atomic_write_text
    from moesim.scenario_init import InitRequest, scenario_text

    modes = mode or ["training"]
    for m in modes:
        if m not in ("training", "prefill", "decode"):
            raise InputError("expected training, prefill or decode", field="--mode", value=m)
    if out.exists() and not force:
        raise InputError("exists; give --force to replace it", file=out)
    check_writable(out)
    request = InitRequest(
        out=out,
        model=model,
        hardware=hardware,
        nodes=nodes,
        devices_per_node=devices_per_node,
        trace=trace,
        synthetic=synthetic,
        modes=modes,  # type: ignore[arg-type]
        tokens_per_device=tokens_per_device,
        placement=placement,
        dispatcher=dispatcher,
        seed=seed,
    )
    atomic_write_text(out, scenario_text(request))
    console.print(f"wrote {out}; run: moesim simulate {out} --out reports/{out.stem}")


@app.command()
def simulate(
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


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the model presets with total and active parameters computed from their shapes."""
    from moesim.model.shapes import get_preset, list_presets

    rows: list[dict[str, Any]] = []
    for name in list_presets():
        m = get_preset(name)
        rows.append(
            {
                "name": m.name,
                "total_params": m.total_params(),
                "active_params": m.active_params(),
                "layers": m.num_layers,
                "moe_layers": m.num_moe_layers,
                "d_model": m.d_model,
                "num_experts": m.num_experts,
                "top_k": m.top_k,
                "shared_experts": m.num_shared_experts,
                "expert_d_ff": m.expert_d_ff,
                "attention": m.attention.kind,
                "vocab_size": m.vocab_size,
                "source": m.source,
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(
        "model",
        "total",
        "active",
        "layers (MoE)",
        "d_model",
        "experts",
        "top-k",
        "shared",
        "expert d_ff",
        title="model presets",
    )
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['total_params'] / 1e9:.1f} B",
            f"{r['active_params'] / 1e9:.2f} B",
            f"{r['layers']} ({r['moe_layers']})",
            str(r["d_model"]),
            str(r["num_experts"]),
            str(r["top_k"]),
            str(r["shared_experts"]),
            str(r["expert_d_ff"]),
        )
    console.print(table)


@hardware_app.command("list")
def hardware_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the hardware profiles with their headline figures."""
    from moesim.hardware import get_profile, list_profiles

    profiles = [get_profile(n) for n in list_profiles()]
    if as_json:
        print_json([p.model_dump(exclude={"sources"}) for p in profiles])
        return
    table = Table(
        "name",
        "BF16 TFLOP/s",
        "FP8 TFLOP/s",
        "HBM",
        "HBM GB/s",
        "scale-up GB/s",
        "domain",
        "scale-out GB/s",
        title="hardware profiles (dense, per device, per direction)",
    )
    for p in profiles:
        table.add_row(
            p.name,
            f"{p.compute.bf16_dense_tflops:,.0f}",
            f"{p.compute.fp8_dense_tflops:,.0f}" if p.compute.fp8_dense_tflops else "-",
            f"{p.memory.hbm_bytes / 1e9:,.0f} GB",
            f"{p.memory.hbm_bandwidth_gbps:,.0f}",
            f"{p.scale_up.bandwidth_gbps:,.0f}",
            f"{p.scale_up.domain_size} ({p.scale_up.topology})",
            f"{p.scale_out.bandwidth_gbps:,.1f}",
        )
    console.print(table)


@hardware_app.command("show")
def hardware_show(
    name: Annotated[str, typer.Argument(help="Profile name, e.g. H100-SXM.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show one hardware profile, every figure with its source."""
    from moesim.hardware import get_profile

    p = get_profile(name)
    data = p.model_dump()
    if as_json:
        print_json(data)
        return
    table = Table("figure", "value", "source", title=p.name, show_lines=False)
    for path in p.figure_paths():
        section, _, key = path.partition(".")
        value = data[section][key] if key else data[section]
        table.add_row(
            path, f"{value:,}" if isinstance(value, int | float) else str(value), p.sources[path]
        )
    console.print(table)


# ----- reference model and capture (moesim.model) ------------------------------------------
# (commands: train-reference, capture)
from moesim.model.commands import train_reference_cmd  # noqa: E402

app.command("train-reference")(train_reference_cmd)

from moesim.model.capture_cmd import capture_cmd  # noqa: E402

app.command("capture")(capture_cmd)


# ----- placement (moesim.placement) ---------------------------------------------------------
# (commands: place)
from moesim.placement.commands import place_cmd, replan_cmd  # noqa: E402

app.command("place")(place_cmd)
app.command("replan")(replan_cmd)


# ----- kernels (moesim.kernels) -------------------------------------------------------------
# (commands: kernels bench, kernels import-profile, kernels predict)
from moesim.kernels.commands import (  # noqa: E402
    import_profile_cmd,
    kernels_bench_cmd,
    predict_cmd,
)

kernels_app.command("bench")(kernels_bench_cmd)
kernels_app.command("import-profile")(import_profile_cmd)
kernels_app.command("predict")(predict_cmd)


# ----- sweeps (moesim.sweep) ---------------------------------------------------------------
# (command: sweep)
from moesim.sweep.commands import sweep_cmd  # noqa: E402

app.command("sweep")(sweep_cmd)

# ----- capacity planning and reports (moesim.plan, moesim.report) ---------------------------
# (commands: plan-capacity, report)
from moesim.plan.commands import plan_capacity_cmd, report_cmd  # noqa: E402

app.command("plan-capacity")(plan_capacity_cmd)
app.command("report")(report_cmd)


# ----- traces (moesim.traces) ---------------------------------------------------------------


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError("expected comma-separated integers", field=option, value=text) from None


@trace_app.command("import")
def trace_import(
    src: Annotated[Path, typer.Argument(help="File or folder to import.")],
    out: Annotated[Path, typer.Option(help="Trace folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="flame-jsonl | vllm-npy | counts-json.")],
    experts: Annotated[
        int | None, typer.Option(help="Routed experts (vllm-npy; counts-json overrides).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per token (counts-json).")] = None,
    layers: Annotated[
        str | None, typer.Option(help="Model layer of each array layer, e.g. 3,4,5 (vllm-npy).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model key in a counts JSON.")] = None,
    domain: Annotated[str | None, typer.Option(help="Domain key in a counts JSON.")] = None,
    kind: Annotated[str, typer.Option(help="Count kind in a counts JSON.")] = "expert_counts",
    seed: Annotated[int, typer.Option(help="Seed for counts-json expansion.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    force: ForceOption = False,
) -> None:
    """Import routing from another format into the trace store.

    counts-json expands per-layer expert counts into a trace with exactly those counts
    (tokens drawn independently per layer, gate weights 1/top_k).
    """
    from moesim.traces.importers import import_trace
    from moesim.traces.store import open_trace

    check_output_folder(out, "trace", force=force)  # before reading the source
    with status(f"importing {src}"):
        path = import_trace(
            fmt,
            src,
            out,
            num_experts=experts,
            top_k=top_k,
            layers=_int_list(layers, "layers"),
            model=model,
            domain=domain,
            kind=kind,
            seed=seed,
            force=force,
        )
    info = open_trace(path)
    summary = {
        "trace": str(path),
        "layers": list(info.layers),
        "tokens": info.num_tokens,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
    }
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"wrote {path}: {len(info.layers)} layers x {info.num_tokens:,} tokens, "
            f"{info.num_experts} experts, top-{info.top_k}"
        )


@trace_app.command("stats")
def trace_stats_cmd(
    trace: Annotated[Path, typer.Argument(help="Trace folder.")],
    top: Annotated[int, typer.Option(help="How many pairs / affinities to list.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Per layer: expert counts, expert balance (max / mean assignments per expert), entropy,
    co-activated pairs, cross-layer affinities (one streaming pass)."""
    from moesim.traces.stats import trace_stats

    stats = trace_stats(trace, top=top)
    if as_json:
        print_json(stats)
        return
    console.print(
        f"{stats['trace']}: {stats['tokens']:,} tokens x {len(stats['layers'])} layers, "
        f"{stats['num_experts']} experts, top-{stats['top_k']}"
    )
    table = Table(
        "layer",
        "expert balance",
        "hot expert",
        "entropy (bits)",
        "top pair (lift)",
        "next-layer affinity (P)",
    )
    for la in stats["layers"]:
        pair = la["top_coactivated_pairs"][:1]
        aff = la.get("top_next_layer_affinities", [])[:1]
        table.add_row(
            str(la["layer"]),
            f"{la['expert_balance']:.3f}",
            str(la["hot_expert"]),
            f"{la['entropy_bits']:.2f} / {la['entropy_max_bits']:.2f}",
            f"{pair[0]['experts']} ({pair[0]['lift']:.1f}x)" if pair else "-",
            f"{aff[0]['experts']} ({aff[0]['p_given_first']:.2f})" if aff else "-",
        )
    console.print(table)


@trace_app.command("upgrade")
def trace_upgrade(
    trace: Annotated[Path, typer.Argument(help="Trace folder to rewrite in place.")],
) -> None:
    """Rewrite a trace written by an older moesim (a `layer` column in every file as well
    as in the folder names) so pandas, pyarrow datasets, DuckDB and Polars open it as it
    is. Rows and metadata are kept; the folder is swapped in whole."""
    from moesim.traces.store import upgrade_trace

    done = upgrade_trace(trace)
    console.print(f"{'upgraded' if done else 'already current:'} {trace}")


@trace_app.command("synth")
def trace_synth(
    experts: Annotated[int, typer.Option(help="Routed experts per layer.", min=1)],
    top_k: Annotated[int, typer.Option(help="Experts per token.", min=1)],
    layers: Annotated[int, typer.Option(help="MoE layers.", min=1)],
    tokens: Annotated[int, typer.Option(help="Tokens per layer.", min=1)],
    out: Annotated[Path, typer.Option(help="Trace folder to write.")],
    dist: Annotated[
        str,
        typer.Option(
            help="uniform | zipf:S | dirichlet:A | drift:s=S,speed=V | burst:s=S,p=P,factor=F"
        ),
    ] = "uniform",
    steps: Annotated[int, typer.Option(help="Steps the tokens are split into.", min=1)] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: ForceOption = False,
) -> None:
    """Write seeded synthetic routing (uniform, Zipf, Dirichlet, drifting hot spots, bursts)."""
    from moesim.traces.synthetic import synth_to_store

    check_output_folder(out, "trace", force=force)  # before any work
    with progress_bar("trace synth", tokens, "tokens") as advance:
        path = synth_to_store(
            out,
            num_experts=experts,
            top_k=top_k,
            num_layers=layers,
            num_tokens=tokens,
            distribution=dist,
            steps=steps,
            seed=seed,
            force=force,
            progress=advance,
        )
    console.print(
        f"wrote {path}: {layers} layers x {tokens:,} tokens, {experts} experts, "
        f"top-{top_k}, {dist}, seed {seed}"
    )


# ----- calibration from a profiler trace (moesim.kernels.calibrate) ---------------------------


@app.command()
def calibrate(
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


# ----- all-to-all microbenchmark (moesim.sim.a2a) ------------------------------------------


@app.command()
def a2a(
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


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"moesim {__version__}")
        raise typer.Exit()


def main() -> None:
    """Entry point: bad input (ours or a command-line usage error) becomes one line on
    stderr and exit status 2."""
    # typer ships its own copy of click; find its exception base classes through a public one
    usage_error: type[Exception] = next(
        c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
    )
    args = sys.argv[1:]
    if args[:1] == ["plan-capacity"]:
        from moesim.plan.commands import expand_multi_value_options

        args = expand_multi_value_options(args)
    try:
        rc = app(args=args, standalone_mode=False)
    except InputError as err:
        sys.stderr.write(f"moesim: error: {err}\n")
        raise SystemExit(2) from None
    except usage_error as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # help already printed
            raise SystemExit(0) from None
        ctx = getattr(err, "ctx", None)
        cmd = ctx.command_path if ctx else "moesim"
        msg = " ".join(getattr(err, "format_message", err.__str__)().split())
        sys.stderr.write(f"{cmd}: error: {msg} (see '{cmd} --help')\n")
        raise SystemExit(2) from None
    except typer.Abort:
        sys.stderr.write("moesim: aborted\n")
        raise SystemExit(130) from None
    except OSError as err:  # a path that cannot be read or written: the user's to fix
        where = f"{err.filename}: " if err.filename else ""
        sys.stderr.write(f"moesim: error: {where}{err.strerror or err}\n")
        raise SystemExit(2) from None
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
