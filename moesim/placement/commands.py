"""``moesim place`` and ``moesim replan``: parse the options, call
:func:`moesim.placement.api.plan_placement` or :func:`~moesim.placement.api.replan_trace`,
print and write."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from moesim.placement.api import load_loads, parse_window

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
    from moesim.placement.api import plan_placement
    from moesim.sim.refine import refine_for_scenario

    result = plan_placement(
        trace=trace,
        window=window,
        loads=loads,
        counts_model=counts_model,
        domain=domain,
        nodes=nodes,
        devices_per_node=gpus_per_node,
        redundant=redundant,
        strategy=strategy,
        groups=groups,
        model=model,
        hardware=hardware,
        precision=precision,
        replica_choice=replica_choice,
        previous=previous,
        max_moved_share=max_moved_share,
        forecast=forecast,
        refine=None
        if refine_scenario is None
        else partial(
            refine_for_scenario, scenario_path=refine_scenario, iterations=refine_steps, seed=seed
        ),
    )
    result.write(out)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=1) + "\n")
        return
    metrics = result.metrics
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
    from moesim.placement.api import replan_trace

    res = replan_trace(
        trace,
        window_tokens=window_tokens,
        nodes=nodes,
        devices_per_node=gpus_per_node,
        redundant=redundant,
        strategy=strategy,
        groups=groups,
        max_moved_share=max_moved_share,
        replica_choice=replica_choice,
        tokens_per_batch=tokens_per_batch,
        forecast=forecast,
        model=model,
        hardware=hardware,
        precision=precision,
    )
    if as_json:
        sys.stdout.write(json.dumps(res.to_json(), indent=1) + "\n")
        return
    rows, summary, modes, batch = res.windows, res.mean, res.modes, res.tokens_per_batch
    console = make_console()
    console.print(
        f"{trace}: {res.num_windows} windows of {window_tokens} tokens, "
        f"{strategy} on {nodes} x {gpus_per_node} devices ({redundant} redundant slots), "
        f"{replica_choice} replicas, batches of {batch} tokens"
    )
    table = Table(
        "window",
        "tokens",
        *modes,
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
                for m in modes
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
