"""``moesim place``: plan an expert placement from a trace window or from expert loads."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from moesim.errors import InputError

if TYPE_CHECKING:
    from moesim.model.shapes import ModelShape

__all__ = ["load_loads", "parse_window", "place_cmd", "replan_cmd"]

# options `moesim place` and `moesim replan` share
NodesOpt = Annotated[int, typer.Option(help="Nodes.", min=1)]
GpusPerNodeOpt = Annotated[int, typer.Option(help="Devices per node.", min=1)]
RedundantOpt = Annotated[int, typer.Option(help="Extra expert slots per layer.", min=0)]
StrategyOpt = Annotated[
    str,
    typer.Option(
        help="contiguous | round-robin | greedy | eplb-hierarchical | eplb-global | "
        "balanced-hierarchical | balanced-global | shadow | affinity."
    ),
]
GroupsOpt = Annotated[
    int | None,
    typer.Option(
        help="Contiguous expert groups for eplb-hierarchical and balanced-hierarchical "
        "(EPLB's num_groups; default: one per node).",
        min=1,
    ),
]
HardwareOpt = Annotated[str, typer.Option(help="Hardware profile for the memory check.")]
PrecisionOpt = Annotated[str, typer.Option(help="Expert weight precision: bf16 | fp8 | int4.")]


def _check_choices(strategy: str, replica_choice: str, groups: int | None = None) -> None:
    """A one-line error for an unknown planner or replica choice, or --groups given to a
    planner without expert groups."""
    from moesim.placement.choice import REPLICA_CHOICES
    from moesim.placement.planners import STRATEGIES

    if strategy not in STRATEGIES:
        raise InputError(
            f"unknown strategy; valid: {', '.join(STRATEGIES)}", field="strategy", value=strategy
        )
    if replica_choice not in REPLICA_CHOICES:
        raise InputError(
            f"valid: {', '.join(REPLICA_CHOICES)}", field="replica-choice", value=replica_choice
        )
    if groups is not None and strategy not in ("eplb-hierarchical", "balanced-hierarchical"):
        raise InputError(
            f"expert groups are for eplb-hierarchical and balanced-hierarchical, not {strategy}",
            field="groups",
            value=groups,
        )


def _model_slots(
    model: str, hardware: str, precision: str, num_experts: int
) -> tuple[ModelShape, int]:
    """The preset ``model`` (its expert count checked against the data's) and the expert
    slots per device that fit ``hardware``'s memory."""
    from moesim.hardware import get_profile
    from moesim.model.shapes import get_preset
    from moesim.placement.memory import max_expert_slots

    shape = get_preset(model)
    if shape.num_experts != num_experts:
        raise InputError(
            f"the loads have {num_experts} experts, {shape.name} has {shape.num_experts}",
            field="model",
            value=model,
        )
    return shape, max_expert_slots(shape, get_profile(hardware), precision)


def parse_window(text: str, num_tokens: int) -> tuple[int, int]:
    """``START:END`` token indices (END exclusive; either side may be empty)."""
    start_s, sep, end_s = text.partition(":")
    try:
        start = int(start_s) if start_s.strip() else 0
        end = int(end_s) if end_s.strip() else num_tokens
    except ValueError:
        raise InputError("expected START:END token indices", field="window", value=text) from None
    if not sep or not 0 <= start < end <= num_tokens:
        raise InputError(
            f"expected START:END with 0 <= START < END <= {num_tokens}", field="window", value=text
        )
    return start, end


def load_loads(
    path: Path, *, model: str | None = None, domain: str | None = None
) -> tuple[np.ndarray, list[int] | None]:
    """(L, E) expert loads from a .npy or .csv array, or a counts JSON (``model``: its first
    model by default; ``domain``: all domains summed by default), and the model layer of
    each row where the file names them (a counts JSON), else None."""
    if not path.is_file():
        raise InputError("file not found", file=path)
    suffix = path.suffix.lower()
    layers: list[int] | None = None
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"not a .npy array ({exc})", file=path) from None
        if not isinstance(arr, np.ndarray):  # np.load opened an .npz archive
            raise InputError("an .npz archive, not an .npy array", file=path)
        if arr.dtype.kind not in "iuf":
            raise InputError("expected an integer or float array", file=path, value=str(arr.dtype))
    elif suffix == ".csv":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty file: the size check below says so
                arr = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as exc:
            raise InputError(f"not a numeric CSV ({exc})", file=path) from None
    elif suffix == ".json":
        from moesim.traces.importers import load_counts_json

        layers, arr = load_counts_json(path, model=model, domain=domain)
    else:
        raise InputError("expected a .npy, .csv or counts .json file", file=path)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise InputError("expected a layers x experts array", file=path, value=list(arr.shape))
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        li, ei = (int(x) for x in np.argwhere(bad)[0])
        raise InputError(
            "loads must be finite and >= 0",
            file=path,
            field=f"layer {li}, expert {ei}",
            value=float(arr[li, ei]),
        )
    return arr, layers


def place_cmd(
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Trace folder to plan from.")
    ] = None,
    window: Annotated[
        str | None, typer.Option(help="START:END token indices of the trace to plan from.")
    ] = None,
    loads: Annotated[
        Path | None,
        typer.Option(help="Layers x experts loads: .npy, .csv, or a counts JSON."),
    ] = None,
    counts_model: Annotated[
        str | None, typer.Option(help="Model key in a counts JSON (default: the first).")
    ] = None,
    domain: Annotated[
        str | None, typer.Option(help="Domain in a counts JSON (default: all, summed).")
    ] = None,
    nodes: NodesOpt = 1,
    gpus_per_node: GpusPerNodeOpt = 8,
    redundant: RedundantOpt = 0,
    strategy: StrategyOpt = "eplb-global",
    groups: GroupsOpt = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model preset: checks that the slots fit device memory."),
    ] = None,
    hardware: HardwareOpt = "H100-SXM",
    precision: PrecisionOpt = "bf16",
    replica_choice: Annotated[
        str,
        typer.Option(help="nearest | round-robin | least-loaded | batch-split (trace metrics)."),
    ] = "nearest",
    previous: Annotated[
        Path | None,
        typer.Option(help="Placement YAML in use now: re-plan from it (with --max-moved-share)."),
    ] = None,
    max_moved_share: Annotated[
        float | None,
        typer.Option(help="Move at most this share of slots away from --previous.", min=0, max=1),
    ] = None,
    forecast: Annotated[
        bool,
        typer.Option(
            "--forecast/--no-forecast",
            help="With --trace --window START:END and as many tokens before START: plan "
            "from the load forecast of that earlier window and this one.",
        ),
    ] = True,
    refine_scenario: Annotated[
        Path | None,
        typer.Option(
            help="Scenario YAML: improve the plan by local search on the simulated step "
            "time of its first mode, with the plan in place of its placement."
        ),
    ] = None,
    refine_steps: Annotated[
        int, typer.Option(help="Slot swaps --refine-scenario tries.", min=1)
    ] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the refinement's swaps.")] = 0,
    out: Annotated[Path, typer.Option(help="Placement YAML to write.")] = Path("placement.yaml"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the placement and its metrics as JSON.")
    ] = False,
) -> None:
    """Plan where each expert (and its replicas) lives, from a trace or expert loads.

    Writes the plan (per layer, per device, the experts it hosts) to --out; prints planned
    balance (max / mean device load, each expert's load split over its replicas) and, for
    a trace, routed balance and remote nodes per token on the planning window. With
    --refine-scenario, the plan is then improved on the scenario's simulated step time
    (printed before and after) and the refined plan is written.
    """
    from moesim.placement.io import placement_dict, write_placement
    from moesim.placement.metrics import expert_loads, planned_balance, score_window
    from moesim.placement.planners import plan, ready

    if (trace is None) == (loads is None):
        raise InputError("give exactly one of --trace or --loads", field="trace")
    if trace is not None and (counts_model or domain):
        raise InputError(
            "--counts-model and --domain read a counts JSON given as --loads", field="trace"
        )
    _check_choices(strategy, replica_choice, groups)
    ids = None
    before: tuple[int, int] | None = None
    layer_names: list[int] | None = None
    if trace is not None:
        from moesim.traces.store import read_trace

        tr = read_trace(trace)
        start, end = parse_window(window, tr.num_tokens) if window else (0, tr.num_tokens)
        ids = tr.expert_ids[:, start:end]  # (L, n, K)
        e = tr.num_experts
        w = expert_loads(ids, e).astype(np.float64)
        if forecast and start >= end - start:
            from moesim.placement.replan import forecast_loads

            before = (2 * start - end, start)
            w = forecast_loads(
                expert_loads(tr.expert_ids[:, before[0] : before[1]], e).astype(np.float64), w
            )
        layer_names = list(tr.layers)
    else:
        assert loads is not None
        if window:
            raise InputError("--window needs --trace", field="window", value=window)
        w, layer_names = load_loads(loads, model=counts_model, domain=domain)
    mem = None
    if model is not None:
        _, mem = _model_slots(model, hardware, precision, w.shape[1])
    co = cross = None
    if strategy == "affinity" and ids is not None:
        from moesim.placement.affinity import coactivation

        co, cross = coactivation(ids, w.shape[1])
    ready(strategy)
    t0 = time.perf_counter()
    p = plan(
        w,
        strategy,
        nodes=nodes,
        devices_per_node=gpus_per_node,
        redundant=redundant,
        max_slots_per_device=mem,
        groups=groups,
        coactivation=co,
        cross_layer=cross,
    )
    old = None
    if previous is not None:
        from moesim.placement.io import read_placement
        from moesim.placement.replan import incremental

        old, _ = read_placement(
            previous,
            num_experts=w.shape[1],
            num_layers=w.shape[0],
            num_devices=p.num_devices,
            max_slots_per_device=mem,
            devices_per_node=gpus_per_node,
        )
        if old.slots.shape != p.slots.shape:
            raise InputError(
                f"has {old.slots.shape[2]} slots per device, the plan {p.slots.shape[2]}",
                file=previous,
                field="layers[0].devices[0]",
                value=old.slots.shape[2],
            )
        if max_moved_share is not None:
            p = incremental(
                old,
                w,
                max_moved_share=max_moved_share,
                target=p,
                devices_per_node=gpus_per_node,
            )
    elif max_moved_share is not None:
        raise InputError("--max-moved-share needs --previous", field="max-moved-share")
    plan_ms = (time.perf_counter() - t0) * 1e3
    refined = None
    if refine_scenario is not None:
        from moesim.sim.refine import refine_for_scenario

        refined = refine_for_scenario(p, refine_scenario, iterations=refine_steps, seed=seed)
        p = refined.placement
    bal = planned_balance(p, w)
    metrics: dict[str, Any] = {
        "strategy": strategy,
        **({"groups": groups} if groups is not None else {}),
        "devices": p.num_devices,
        "slots_per_device": int(p.slots.shape[2]),
        "redundant": redundant,
        "planned_balance_mean": round(float(bal.mean()), 6),
        "planned_balance_max": round(float(bal.max()), 6),
        "plan_ms": round(plan_ms, 3),
    }
    if before is not None:
        metrics["forecast_from_window"] = f"{before[0]}:{before[1]}"
    if mem is not None:
        metrics["slots_fit_memory"] = mem
    if refined is not None:
        metrics |= {
            "refine_mode": refined.mode,
            "step_time_us_before": round(refined.step_time_us_before, 3),
            "step_time_us_after": round(refined.step_time_us_after, 3),
            "refine_swaps_kept": refined.swaps_kept,
        }
    if old is not None:
        from moesim.placement.metrics import moved_share

        metrics["moved_share"] = round(moved_share(old, p), 6)
    if ids is not None:
        d = p.num_devices
        batch = (ids.shape[1] // d) * d
        if batch:
            sc = score_window(
                p,
                ids[:, :batch],
                devices_per_node=gpus_per_node,
                tokens_per_batch=batch,
                replica_choice=replica_choice,  # type: ignore[arg-type]
            ).summary()
            metrics |= {
                "replica_choice": replica_choice,
                "routed_balance_mean": round(sc["balance_mean"], 6),
                "remote_nodes_per_token": round(sc["remote_nodes_per_token"], 6),
            }
    write_placement(out, p, layer_names, nodes=nodes, devices_per_node=gpus_per_node)
    if as_json:
        data = placement_dict(p, layer_names)
        sys.stdout.write(
            json.dumps({"layers": data["layers"], "metrics": metrics}, indent=1) + "\n"
        )
        return
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        sys.stdout.write(f"{k:<{width}}  {v}\n")
    sys.stdout.write(f"wrote {out}\n")


def replan_cmd(
    trace: Annotated[Path, typer.Option("--trace", help="Trace folder to replay.")],
    window_tokens: Annotated[
        int, typer.Option(help="Tokens per window: a plan is made after each window.", min=1)
    ],
    nodes: NodesOpt = 1,
    gpus_per_node: GpusPerNodeOpt = 8,
    redundant: RedundantOpt = 0,
    strategy: StrategyOpt = "eplb-global",
    groups: GroupsOpt = None,
    max_moved_share: Annotated[
        float | None,
        typer.Option(help="Also replay re-plans moving at most this share of slots.", min=0, max=1),
    ] = None,
    replica_choice: Annotated[
        str, typer.Option(help="nearest | round-robin | least-loaded | batch-split.")
    ] = "nearest",
    tokens_per_batch: Annotated[
        int | None,
        typer.Option(
            help="Tokens per scored batch, a multiple of the devices (default: the window, "
            "at most 2,048, rounded down to one); tokens beyond whole batches are not scored.",
            min=1,
        ),
    ] = None,
    forecast: Annotated[
        bool,
        typer.Option(
            "--forecast/--no-forecast",
            help="Plan from the load forecast of the last two windows (from the second "
            "re-plan on), else from the last window alone.",
        ),
    ] = True,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model preset: migration bytes (expert weights moved), inter-node bytes, "
            "and the check that the slots fit device memory."
        ),
    ] = None,
    hardware: HardwareOpt = "H100-SXM",
    precision: PrecisionOpt = "bf16",
    as_json: Annotated[bool, typer.Option("--json", help="Print the windows as JSON.")] = False,
) -> None:
    """Replay a trace in windows: plan from each window, score on the next, against a
    static plan made from the first window.

    Per scored window and mode (static, full re-plan, and with --max-moved-share re-plans
    that move at most that share of slots): balance (max / mean device load per batch,
    mean and p99), remote nodes per token, share of slots moved and, with --model, the
    expert weight bytes moved and the inter-node bytes per batch.
    """
    from rich.table import Table

    from moesim.console import make_console
    from moesim.placement.replan import planner_for, replay, replay_means
    from moesim.traces.store import read_trace

    _check_choices(strategy, replica_choice, groups)
    tr = read_trace(trace)
    if tr.num_tokens < 2 * window_tokens:
        raise InputError(
            f"the trace has {tr.num_tokens} tokens: fewer than two windows",
            field="window-tokens",
            value=window_tokens,
        )
    d = nodes * gpus_per_node
    batch = tokens_per_batch or min(window_tokens, 2048) // d * d
    if batch > window_tokens or batch < d or batch % d:
        raise InputError(
            f"need a multiple of the {d} devices, at most a window ({window_tokens} tokens)",
            field="tokens-per-batch" if tokens_per_batch else "window-tokens",
            value=tokens_per_batch or window_tokens,
        )
    mem = None
    moved_bytes = wire_bytes = 0.0
    if model is not None:
        from moesim.costs.roofline import bytes_per_assignment
        from moesim.placement.memory import expert_bytes

        shape, mem = _model_slots(model, hardware, precision, tr.num_experts)
        moved_bytes = expert_bytes(shape, precision)
        wire_bytes = 2 * bytes_per_assignment(shape.d_model, "bf16")  # dispatch + combine
    planner = planner_for(
        strategy,
        nodes=nodes,
        devices_per_node=gpus_per_node,
        redundant=redundant,
        max_slots_per_device=mem,
        groups=groups,
    )
    modes: list[tuple[str, bool, float | None]] = [("static", True, None), ("full", False, None)]
    if max_moved_share is not None:
        modes.append((f"limit-{max_moved_share:g}", False, max_moved_share))
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, float]] = {}
    keys = ["balance_mean", "balance_p99", "remote_nodes_per_token", "moved_share"]
    whole = ("migration_bytes", "inter_node_bytes_per_batch")  # bytes: whole numbers per row
    if model is not None:
        keys += whole
    for mode, static, share in modes:
        results = replay(
            tr.expert_ids,
            window_tokens,
            planner,
            devices_per_node=gpus_per_node,
            tokens_per_batch=batch,
            replica_choice=replica_choice,  # type: ignore[arg-type]
            expert_bytes=moved_bytes,
            bytes_per_assignment=wire_bytes,
            max_moved_share=share,
            static=static,
            forecast=forecast,
            num_experts=tr.num_experts,
        )
        for r in results:
            figures = r.score | {"moved_share": r.moved_share, "migration_bytes": r.migration_bytes}
            rows.append(
                {
                    "window": r.window,
                    "tokens": f"{r.window * window_tokens}:{(r.window + 1) * window_tokens}",
                    "mode": mode,
                }
                | {k: round(figures[k], None if k in whole else 6) for k in keys}
            )
        means = replay_means(results)
        summary[mode] = {k: round(means[k], 6) for k in keys}
    if as_json:
        sys.stdout.write(json.dumps({"windows": rows, "mean": summary}, indent=1) + "\n")
        return
    console = make_console()
    console.print(
        f"{trace}: {tr.num_tokens // window_tokens} windows of {window_tokens} tokens, "
        f"{strategy} on {nodes} x {gpus_per_node} devices ({redundant} redundant slots), "
        f"{replica_choice} replicas, batches of {batch} tokens"
    )
    table = Table(
        "window",
        "tokens",
        *(m for m, _, _ in modes),
        title="balance per batch, mean / p99 (share of slots moved)",
    )
    for w in sorted({r["window"] for r in rows}):
        cells = {r["mode"]: r for r in rows if r["window"] == w}
        first = next(iter(cells.values()))
        table.add_row(
            str(w),
            first["tokens"],
            *(
                f"{cells[m]['balance_mean']:.3f} / {cells[m]['balance_p99']:.3f}"
                + (f" ({cells[m]['moved_share']:.0%})" if cells[m]["moved_share"] else "")
                for m, _, _ in modes
            ),
        )
    console.print(table)
    for mode, means in summary.items():
        extra = (
            f", migration {means['migration_bytes'] / 1e9:.2f} GB per re-plan"
            if "migration_bytes" in means
            else ""
        )
        console.print(
            f"{mode}: balance {means['balance_mean']:.3f} (p99 {means['balance_p99']:.3f}), "
            f"remote nodes/token {means['remote_nodes_per_token']:.3f}, "
            f"moved {means['moved_share']:.1%} of slots per re-plan{extra}"
        )
