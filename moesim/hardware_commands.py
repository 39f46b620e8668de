"""CLI commands: ``moesim hardware list`` and ``moesim hardware show`` (:mod:`moesim.hardware`).

Registered in :mod:`moesim.cli`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from moesim.console import make_console, print_json

__all__ = ["hardware_list_cmd", "hardware_show_cmd"]

console = make_console()


def hardware_list_cmd(
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


def hardware_show_cmd(
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
