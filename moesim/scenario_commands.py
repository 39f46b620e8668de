"""CLI command: ``moesim init`` writes a scenario file (:mod:`moesim.scenario_init`).

Registered in :mod:`moesim.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moesim.console import make_console
from moesim.errors import InputError
from moesim.fileio import check_writable

__all__ = ["init_cmd"]

console = make_console()


def init_cmd(
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
