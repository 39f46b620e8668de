"""The capacity plan's outputs: plan.json, evaluations.parquet, report.html and summary.md.

The page answers first (a table per hardware), then compares the simulated cluster sizes
(memory, step-time breakdown, drop rate against capacity factor, placements, throughput
against devices) and shows the per-device detail of the first hardware's recommendation.
"""

from __future__ import annotations

import html as html_lib
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.fileio import write_output_folder
from moesim.model.shapes import get_preset
from moesim.plan.capacity import (
    Evaluation,
    HardwarePlan,
    PlanRequest,
    drop_frame,
    evaluations_frame,
)
from moesim.report.figures import memory_svg
from moesim.report.page import (
    Section,
    figure,
    html_table,
    md_table,
    missing,
    render_markdown,
    render_page,
)
from moesim.report.run import MEMORY_NOTE, RunData, memory_table, run_sections
from moesim.report.summary import fmt_bytes, fmt_us
from moesim.report.sweep import drops_section, results_sections, scaling_section

__all__ = ["assumptions", "plan_json", "write_plan"]


def assumptions(request: PlanRequest) -> str:
    """What the simulations assumed, in one paragraph."""
    routing = (
        f"routing replayed from {request.trace}"
        if request.trace is not None
        else f"synthetic {request.distribution} routing (seed {request.seed})"
    )
    sim_precision = "fp8 GEMMs (int4 weights dequantised)" if request.precision == "int4" else ""
    if request.dropless:
        capacity = (
            "dropless (unlimited expert capacity, no drop budget given; the capacity factor a "
            "padded kernel would need is its largest slot load over the mean slot load)"
        )
    else:
        capacity = (
            f"drop budget {100 * request.max_drop_rate:g}%: capacity factors tried "
            f"{', '.join(f'{c:g}' for c in request.capacity_factors)} (the smallest within "
            "the budget kept where it is faster than dropless; memory answer at the largest)"
        )
    tokens = (
        f"{request.tokens_per_device} concurrent sequences per device (one new token each) of "
        f"{request.sequence_length} tokens context"
        if request.mode == "decode"
        else f"{request.tokens_per_device} tokens per device of {request.sequence_length} "
        "tokens context"
    )
    sizes = (
        f"{request.nodes} node(s) of each profile"
        if request.nodes is not None
        else f"cluster sizes up to {request.max_devices} devices; throughput assumed to grow "
        "with devices (doubling, then bisection)"
    )
    redundant = f", {request.redundant} redundant expert slots per layer" * bool(request.redundant)
    return (
        f"Assumed: {request.mode} with {tokens}, {request.steps} simulated step(s), {routing}, "
        f"{request.precision} weights{' timed as ' + sim_precision if sim_precision else ''}, "
        f"{capacity}{redundant}, expert parallelism with dense weights replicated, {sizes}. "
        "Tokens/s count processed assignments only (tokens × processed share / step time)."
    )


def plan_json(plans: list[HardwarePlan], request: PlanRequest) -> dict[str, Any]:
    """``{hardware name: answer}`` in the order the hardware was given."""
    return {p.hardware: p.answer(request) for p in plans}


def _answer(plans: list[HardwarePlan], request: PlanRequest) -> Section:
    header = (
        "hardware",
        "min devices (memory)",
        "min devices (throughput)",
        "min devices (latency)",
        "capacity factor",
        "placement",
        "tokens/s (dropped)",
        "step time",
        "memory / device",
        "$ per M tokens",
    )
    rows = []
    sentences = []
    for p in plans:
        a = p.answer(request)
        rec = p.recommended
        rows.append(
            (
                p.hardware,
                a["min_devices_memory"] or "-",
                a["min_devices_throughput"] or "-",
                a["min_devices_slo"] or "-" if request.latency_slo_ms is not None else "n/a",
                _factor(rec),
                _placement_text(rec),
                f"{a['tokens_per_s']:,.0f} ({100 * a['drop_rate']:.3f}%)" if rec else "-",
                fmt_us(a["step_time_us"]) if rec else "-",
                fmt_bytes(a["memory_per_device_bytes"]) if rec else "-",
                f"{a['cost_per_million_tokens']:.3f}"
                if a["cost_per_million_tokens"] is not None
                else "-",
            )
        )
        if rec:
            capacity = (
                "dropless"
                if rec.capacity_factor is None
                else f"capacity factor {rec.capacity_factor:g}"
            )
            text = (
                f"{p.hardware}: {rec.num_devices} devices ({rec.nodes} × {rec.devices_per_node}) "
                f"give {rec.tokens_per_s:,.0f} tokens/s ({100 * rec.drop_rate:.3f}% dropped) "
                f"with a {fmt_us(rec.step_time_us)} step, {capacity}, "
                f"{_placement_text(rec)} placement; the model fits on {p.min_devices_memory}."
            )
            if rec.capacity_factor is None:
                text += (
                    f" A padded (non-dropless) kernel would need capacity factor "
                    f"{rec.padding_factor:.3f} to drop nothing, and "
                    f"{fmt_bytes(rec.padded_memory_bytes)} per device."
                )
            if a["cost_per_million_tokens"] is not None:
                text += f" Cost: ${a['cost_per_million_tokens']:.3f} per million tokens."
        else:
            text = f"{p.hardware}: no answer ({'; '.join(p.notes)})."
        sentences.append(text)
    target = f"{request.tokens_per_s:,.0f} tokens/s" + (
        f" within {request.latency_slo_ms:g} ms per step"
        if request.latency_slo_ms is not None
        else ""
    )
    intro = (
        f"{request.model}, {request.mode}, target {target}."
        if request.tokens_per_s
        else (
            f"{request.model}, {request.mode}, on {request.nodes} node(s): what fits and how fast."
        )
    )
    html = (
        f"<p>{html_lib.escape(intro)}</p>"
        + "".join(f"<p>{html_lib.escape(s)}</p>" for s in sentences)
        + html_table(header, rows)
        + f'<p class="muted">{html_lib.escape(assumptions(request))}</p>'
    )
    md = "\n\n".join([intro, *sentences, md_table(header, rows), assumptions(request)])
    return Section("answer", html, md)


def _factor(rec: Evaluation | None) -> str:
    if rec is None:
        return "-"
    return "dropless" if rec.capacity_factor is None else f"{rec.capacity_factor:g}"


def _placement_text(rec: Evaluation | None) -> str:
    if rec is None:
        return "-"
    extra = f" + {rec.redundant_slots} redundant" if rec.redundant_slots else ""
    return rec.placement + extra


def _cluster(plans: list[HardwarePlan], request: PlanRequest, run: RunData | None) -> Section:
    shape = get_preset(request.model)
    rows: list[tuple[str, str]] = [
        (
            "model",
            f"{shape.name}: {shape.total_params() / 1e9:.1f} B parameters "
            f"({shape.active_params() / 1e9:.1f} B active), {shape.num_experts} experts, "
            f"top-{shape.top_k}",
        )
    ]
    for p in plans:
        sizes = ", ".join(str(n) for n in p.evaluations)
        rows.append((p.hardware, f"HBM {fmt_bytes(p.hbm_bytes)}; simulated sizes: {sizes or '-'}"))
    if run is not None:
        rows.append(("detail below", run.info["cluster"] + f" ({run.info['hardware']})"))
    return Section("cluster", html_table(None, rows, left=2), md_table(None, rows, left=2))


def _memory(plans: list[HardwarePlan]) -> Section:
    labels, bds = [], []
    for p in plans:
        for n in sorted({x for x in (p.min_devices_memory, *p.evaluations) if x is not None}):
            ev = p.evaluations.get(n)
            if ev is None:
                continue
            labels.append(f"{p.hardware} ×{n}")
            bds.append(ev.memory.as_dict())
    if not labels:
        return missing("memory", "No cluster size was simulated.")
    th, tm = memory_table(labels, bds)
    svg = memory_svg(labels, bds, [b["hbm_bytes"] for b in bds])
    cap = "Bytes one device holds at each simulated size, by component; black tick: HBM capacity."
    return Section(
        "memory",
        figure(svg, cap) + th + f'<p class="muted">{html_lib.escape(MEMORY_NOTE)}</p>',
        tm + "\n\n" + MEMORY_NOTE,
    )


def plan_sections(plans: list[HardwarePlan], request: PlanRequest) -> list[Section]:
    df = evaluations_frame(plans)
    run = None
    rec = next((p.recommended for p in plans if p.recommended is not None), None)
    if rec is not None:
        run = RunData.from_result(rec.result)
    sections = {
        "answer": _answer(plans, request),
        "cluster": _cluster(plans, request, run),
        "memory": _memory(plans),
    }
    if df.empty:
        return [*sections.values()]
    df = df.assign(
        status="ok",
        case_index=range(len(df)),
        axes=[
            json.dumps({"hardware": h, "devices": int(n)})
            for h, n in zip(df["hardware"], df["num_devices"], strict=True)
        ],
    )
    table = results_sections(df, max_drop_rate=request.max_drop_rate)
    sections["breakdown"] = table["breakdown"]
    drops = drop_frame(plans)
    if drops.empty:
        pads = ", ".join(
            f"{ev.hardware} ×{ev.num_devices}: {ev.padding_factor:.3f}"
            for p in plans
            for ev in p.evaluations.values()
        )
        sections["drops"] = missing(
            "drops",
            "Dropless: every simulation ran with unlimited expert capacity (give "
            "--max-drop-rate to try capacity factors). Capacity factor a padded kernel would "
            f"need to drop nothing (largest slot load / mean slot load): {pads}.",
        )
    else:
        drops = drops.assign(setting=drops["hardware"] + " ×" + drops["num_devices"].astype(str))
        sections["drops"] = drops_section(
            drops,
            "setting",
            "Dropped assignments against the capacity factors tried at each simulated size "
            "(routing only; the ladder stops at the first factor within the drop budget).",
            group_title="hardware × devices",
        )
    sections["placement"] = table["placement"]
    sections["scaling"] = scaling_section(
        df,
        "Simulated throughput (solid) against ideal linear scaling from the smallest simulated "
        "size (dashed), per hardware.",
        request.max_drop_rate,
    )
    if run is not None:
        detail = {s.key: s for s in run_sections(run, answer=False)}
        for key in ("heatmap", "stragglers", "links", "timeline"):
            sections[key] = detail[key]
    return [*sections.values()]


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def write_plan(
    plans: list[HardwarePlan], request: PlanRequest, out_dir: Path, *, force: bool = False
) -> dict[str, Path]:
    """Render everything in memory, then write the folder whole
    (:func:`~moesim.fileio.write_output_folder`)."""
    sections = plan_sections(plans, request)
    title = f"moesim capacity plan: {request.model}"
    # the assumptions are stated once, under the answer; the subtitle says what was asked
    subtitle = f"{request.mode} on {', '.join(request.hardware)}: " + (
        "the smallest cluster that meets the target, per hardware."
        if request.tokens_per_s
        else f"{request.nodes} node(s), what fits and how fast."
    )
    source = "moesim plan-capacity " + " ".join(request.hardware)
    answer = plan_json(plans, request)
    payload = {
        "plan.json": (json.dumps(answer, indent=2, sort_keys=False) + "\n").encode(),
        "evaluations.parquet": _parquet_bytes(evaluations_frame(plans)),
        "report.html": render_page(title, subtitle, sections, source).encode(),
        "summary.md": render_markdown(title, subtitle, sections, source).encode(),
    }
    return write_output_folder(out_dir, "plan", payload, force=force)
