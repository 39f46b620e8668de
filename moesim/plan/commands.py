"""CLI command: ``moesim plan-capacity``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from moesim.errors import InputError

__all__ = [
    "MULTI_VALUE_OPTIONS",
    "answer_line",
    "expand_multi_value_options",
    "plan_capacity_cmd",
]

#: options of plan-capacity that take several values after one flag (``--hardware A B``)
MULTI_VALUE_OPTIONS = ("--hardware", "--price-per-device-hour")


def expand_multi_value_options(args: list[str]) -> list[str]:
    """``--hardware A B --json`` → ``--hardware A --hardware B --json`` (click options take
    one value each; the values run until the next ``-``-led token that is not a number)."""
    out: list[str] = []
    current: str | None = None
    for a in args:
        if a.startswith("-") and not _is_number(a):
            current = a if a in MULTI_VALUE_OPTIONS else None
            out.append(a)
        elif current is not None and out[-1] != current:
            out += [current, a]
        else:
            out.append(a)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def plan_capacity_cmd(
    model: Annotated[str, typer.Option(help="Model preset, e.g. DeepSeek-V3.")],
    hardware: Annotated[
        list[str], typer.Option(help="Hardware profile(s); repeat or list after the option.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    tokens_per_s: Annotated[
        float | None,
        typer.Option(
            help="Throughput target, processed tokens/s (required unless --nodes is given)."
        ),
    ] = None,
    latency_slo_ms: Annotated[
        float | None, typer.Option(help="Step-time target (decode: per output token), ms.")
    ] = None,
    trace: Annotated[
        Path | None, typer.Option(help="Routing trace folder (default: synthetic routing).")
    ] = None,
    synthetic: Annotated[
        str, typer.Option(help="Synthetic routing law when no trace: uniform | zipf:S | ...")
    ] = "uniform",
    precision: Annotated[str, typer.Option(help="Weights: bf16 | fp8 | int4.")] = "bf16",
    price_per_device_hour: Annotated[
        list[float] | None,
        typer.Option(help="Price per device-hour: one for all, or one per hardware."),
    ] = None,
    max_drop_rate: Annotated[
        float,
        typer.Option(
            help="Drop budget: largest acceptable share of dropped assignments. 0 (default): "
            "dropless, unlimited expert capacity; above 0, the smallest capacity factor "
            "within the budget is simulated, and kept where it is faster than dropless."
        ),
    ] = 0.0,
    redundant: Annotated[
        int,
        typer.Option(
            help="Redundant expert slots per layer (replicas of hot experts), for the "
            "planned placement; experts + redundant slots must divide among the devices."
        ),
    ] = 0,
    nodes: Annotated[
        int | None,
        typer.Option(
            help="Fix the cluster: evaluate only NODES × the profile's devices per node "
            "(what fits and how fast) instead of searching sizes."
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="decode | prefill | training.")] = "decode",
    tokens_per_device: Annotated[
        int, typer.Option(help="Tokens per device per step (decode: sequences).", min=1)
    ] = 64,
    sequence_length: Annotated[int, typer.Option(help="Context length, tokens.", min=1)] = 4096,
    steps: Annotated[int, typer.Option(help="Simulated steps per size.", min=1)] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic routing.")] = 0,
    max_devices: Annotated[int, typer.Option(help="Largest cluster searched.", min=1)] = 4096,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {hardware: answer} as JSON.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write into an existing folder that is not a capacity plan: only moesim's "
            "own files there are replaced, every other file is left as it is.",
        ),
    ] = False,
) -> None:
    """How many devices hold the model, meet --tokens-per-s, and meet --latency-slo-ms.

    Per hardware: searches cluster sizes (doubling, then bisection; or only --nodes) and
    placements by simulation, dropless unless --max-drop-rate gives a drop budget, and
    writes plan.json, evaluations.parquet, report.html and summary.md to --out. Tokens/s
    count processed assignments only. With --json, prints {"<hardware>":
    {"min_devices_memory": n, "min_devices_throughput": n, "min_devices_slo": n | null,
    "recommended_capacity_factor" (null: dropless), "drop_rate", "padding_factor",
    "recommended_placement", "cost_per_million_tokens", ...}} keyed by profile name.
    """
    from moesim.console import make_console
    from moesim.fileio import check_output_folder
    from moesim.plan.capacity import PlanRequest, plan_capacity
    from moesim.plan.report import assumptions, plan_json, write_plan

    check_output_folder(out, "plan", force=force)  # before any work
    names = [h for item in hardware for h in item.split(",") if h.strip()]
    if trace is not None and not trace.exists():
        raise InputError("trace not found", field="trace", value=str(trace))
    if tokens_per_s is None and nodes is None:
        raise InputError(
            "give a throughput target, or --nodes to fix the cluster size", field="tokens-per-s"
        )
    request = PlanRequest(
        model=model,
        hardware=tuple(names),
        tokens_per_s=0.0 if tokens_per_s is None else tokens_per_s,
        latency_slo_ms=latency_slo_ms,
        trace=trace.resolve() if trace is not None else None,
        distribution=synthetic,
        precision=precision,
        prices_per_device_hour=tuple(price_per_device_hour or ()),
        max_drop_rate=max_drop_rate,
        mode=mode,
        tokens_per_device=tokens_per_device,
        sequence_length=sequence_length,
        steps=steps,
        seed=seed,
        max_devices=max_devices,
        redundant=redundant,
        nodes=nodes,
    )
    err = make_console(stderr=True)
    plans = plan_capacity(request, progress=None if as_json else lambda m: err.print(m))
    files = write_plan(plans, request, out, force=force)
    answer = plan_json(plans, request)
    if as_json:
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return
    con = make_console()
    con.print(assumptions(request))
    for hw, a in answer.items():
        con.print(answer_line(hw, a))
    con.print(f"wrote {', '.join(str(p) for p in files.values())}")


def answer_line(hw: str, a: dict[str, Any]) -> str:
    """One hardware's answer on one line: device counts, then the recommendation with its
    drop rate beside its throughput (and, dropless, the padding a padded kernel would need)."""
    from moesim.report.summary import fmt_bytes

    if a["fixed_devices"] is not None:
        head = f"{hw}: {a['fixed_devices']} devices ({a['nodes'] or '-'} nodes)"
        head += " fit" if a["recommended_devices"] is not None else " do not fit or place"
    else:
        head = (
            f"{hw}: memory {a['min_devices_memory']}, throughput "
            f"{a['min_devices_throughput']}, latency {a['min_devices_slo']} devices"
        )
    notes = f" ({'; '.join(a['notes'])})" if a["notes"] else ""
    if a["recommended_devices"] is None:
        return head + "; no recommendation" + notes
    cost = (
        f", ${a['cost_per_million_tokens']:.3f}/M tokens"
        if a["cost_per_million_tokens"] is not None
        else ""
    )
    cf = a["recommended_capacity_factor"]
    capacity = "dropless" if cf is None else f"capacity factor {cf:g}"
    redundant = f" with {a['redundant_slots']} redundant slots" if a["redundant_slots"] else ""
    line = (
        f"{head}; {capacity}, {a['recommended_placement']} placement{redundant}, "
        f"{a['tokens_per_s']:,.0f} tokens/s at {100 * a['drop_rate']:.3f}% dropped, "
        f"step {a['step_time_us'] / 1e3:.3f} ms, "
        f"{fmt_bytes(a['memory_per_device_bytes'])} per device{cost}"
    )
    if cf is None:
        line += (
            f"; a padded (non-dropless) kernel would need capacity factor "
            f"{a['padding_factor']:.3f} and {fmt_bytes(a['padded_memory_per_device_bytes'])} "
            "per device"
        )
    return line + notes
