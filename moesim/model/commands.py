"""CLI commands: ``moesim models`` (the model presets) and ``moesim train-reference`` (the
reference model; torch is imported only when that command runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from moesim.console import make_console, print_json

__all__ = ["models_cmd", "train_reference_cmd"]

console = make_console()


def models_cmd(
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


def train_reference_cmd(
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Bytes per sequence.")] = 128,
    experts: Annotated[int, typer.Option(help="Routed experts per MoE layer.")] = 16,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = 2,
    router: Annotated[
        str,
        typer.Option(help="softmax_topk | noisy_topk | expert_choice | sigmoid_bias."),
    ] = "softmax_topk",
    balance: Annotated[
        str,
        typer.Option(
            help="none, or '+'-joined: aux (Switch loss), zloss, device (DeepSeek-V2 "
            "device-level loss), loss_free (DeepSeek-V3 bias; router sigmoid_bias)."
        ),
    ] = "none",
    devices: Annotated[
        int, typer.Option(help="Devices the experts are split over, for --balance device.")
    ] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of weights, batches and router noise.")] = 0,
    threads: Annotated[
        int,
        typer.Option(
            help="torch CPU threads (0 = torch's default). 1 is the steadiest on a shared "
            "machine: two threads on two busy cores measured 10x slower.",
            min=0,
        ),
    ] = 1,
    out: Annotated[Path, typer.Option(help="Checkpoint file (config + state_dict).")] = Path(
        "reports/reference/model.pt"
    ),
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print final loss, balance ratio and wall time as JSON."),
    ] = False,
) -> None:
    """Train the reference MoE on CPU on the bytes of Python's stdlib sources.

    Model: d_model 128, 4 MoE layers, each of --experts SwiGLU experts (d_ff 128).
    Prints LM loss (nats/byte), balance ratio (max / mean assignments per expert)
    and mean squared router logit, each averaged over the last 10 % of steps.
    Writes a checkpoint (config + state_dict) to --out.
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moesim.console import make_console
    from moesim.model.reference import MoEConfig
    from moesim.model.train import StepStats, train_reference

    if threads:
        torch.set_num_threads(threads)
    config = MoEConfig(n_experts=experts, top_k=top_k, router=router, n_devices=devices)
    console = make_console(stderr=True)
    with Progress(
        TextColumn("[bold]train-reference[/bold]"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as progress:
        task = progress.add_task("train", total=steps, info="")

        def on_step(s: StepStats) -> None:
            info = f"loss {s.lm_loss:.3f}  balance {s.balance_ratio:.2f}"
            progress.update(task, completed=s.step + 1, info=info)

        result = train_reference(
            config,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            seed=seed,
            balance=balance,
            out=out,
            on_step=on_step,
        )
    summary = result.summary()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    console = make_console()
    console.print(
        f"router {router}, balance {balance}, {steps} steps: "
        f"LM loss {summary['final_lm_loss']:.3f} nats/byte, "
        f"balance ratio {summary['final_balance_ratio']:.3f}, "
        f"mean squared router logit {summary['final_mean_sq_logit']:.3f}, "
        f"router z {summary['final_router_z']:.3f}"
    )
    console.print(
        f"wall time {summary['wall_time_s']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s); "
        f"wrote {summary['checkpoint']}"
    )
