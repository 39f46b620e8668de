"""CLI commands: ``moesim trace import``, ``stats``, ``upgrade`` and ``synth``.

Registered in :mod:`moesim.cli`; the readers and writers are imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moesim.console import make_console, print_json, progress_bar, status
from moesim.errors import InputError
from moesim.fileio import check_output_folder
from moesim.options import ForceOption

if TYPE_CHECKING:
    from moesim.traces.store import RoutingTrace, TraceInfo

__all__ = [
    "trace_import_cmd",
    "trace_json",
    "trace_stats_cmd",
    "trace_synth_cmd",
    "trace_upgrade_cmd",
]

console = make_console()


def trace_json(path: Path, trace: TraceInfo | RoutingTrace) -> dict[str, Any]:
    """What ``trace import``, ``trace synth`` and ``capture`` print with --json: the trace
    folder, its layers, tokens, experts and top-k, and the model, source and capture
    settings its metadata records, under the metadata's own names."""
    return {
        "trace": str(path),
        "layers": list(trace.layers),
        "tokens": trace.num_tokens,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "model": trace.meta.get("model"),
        "source": trace.meta.get("source"),
        "capture": trace.meta.get("capture", {}),
    }


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError("expected comma-separated integers", field=option, value=text) from None


def trace_import_cmd(
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
    if as_json:
        print_json(trace_json(path, info))
    else:
        console.print(
            f"wrote {path}: {len(info.layers)} layers x {info.num_tokens:,} tokens, "
            f"{info.num_experts} experts, top-{info.top_k}"
        )


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


def trace_upgrade_cmd(
    trace: Annotated[Path, typer.Argument(help="Trace folder to rewrite in place.")],
) -> None:
    """Rewrite a trace written by an older moesim (a `layer` column in every file as well
    as in the folder names) so pandas, pyarrow datasets, DuckDB and Polars open it as it
    is. Rows and metadata are kept; the folder is swapped in whole."""
    from moesim.traces.store import upgrade_trace

    done = upgrade_trace(trace)
    console.print(f"{'upgraded' if done else 'already current:'} {trace}")


def trace_synth_cmd(
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    force: ForceOption = False,
) -> None:
    """Write seeded synthetic routing (uniform, Zipf, Dirichlet, drifting hot spots, bursts)."""
    from moesim.traces.store import open_trace
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
    if as_json:
        print_json(trace_json(path, open_trace(path)))
        return
    console.print(
        f"wrote {path}: {layers} layers x {tokens:,} tokens, {experts} experts, "
        f"top-{top_k}, {dist}, seed {seed}"
    )
