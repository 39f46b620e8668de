"""CLI commands of the reference model (torch is imported only when a command runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["train_reference_cmd"]


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
