"""The report of one simulation, built from plain data that a simulate output folder holds.

:class:`RunData` is what the page needs: the scenario facts (``info``), every mode's
summary, and the metrics, per-layer and per-phase tables. ``moesim simulate`` writes it
(``summary.json``, ``metrics.parquet``, ``layers.parquet``, ``phases.parquet``) and renders
the page from it; ``moesim report FOLDER`` reads it back and renders the same page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from moesim.errors import InputError
from moesim.report.figures import (
    balance_svg,
    breakdown_rows_svg,
    load_heatmap_svg,
    memory_svg,
    port_bytes_svg,
    timeline_svg,
)
from moesim.report.frames import metrics_frame, phases_frame
from moesim.report.page import Section, figure, html_table, md_table, missing
from moesim.report.summary import (
    PARTS,
    PHASE_NAMES,
    fmt_bytes,
    fmt_us,
    header_line,
    injected_faults,
    report_warnings,
    tokens_per_device_text,
)
from moesim.sim.simulate import SimResult

__all__ = ["RunData", "run_info", "run_sections"]

RUN_FILES = ("summary.json", "metrics.parquet", "layers.parquet", "phases.parquet")
TIMELINE_DEVICES = 16


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def run_info(result: SimResult) -> dict[str, Any]:
    """The scenario facts the page shows (JSON-ready)."""
    sc, shape, hw = result.scenario, result.shape, result.hw
    layer_map = sc.routing.layer_map
    mapped = "" if layer_map is None else f", routing.layer_map {layer_map}"
    routing = (
        f"trace {sc.routing.trace} ({result.inputs['trace_tokens']:,} tokens, trace layers "
        f"{result.inputs['trace_layers']} replayed on MoE layers {result.inputs['moe_layers']}"
        f"{mapped})"
        if sc.routing.trace is not None
        else f"synthetic: {sc.routing.synthetic}; {result.inputs.get('routing_level')}"
    )
    redundant = f" + {sc.redundant_slots} redundant slots" if sc.redundant_slots else ""
    capacity = (
        "dropless (unlimited capacity)"
        if sc.capacity.factor is None
        else f"capacity factor {sc.capacity.factor} per slot ({sc.capacity.overflow})"
    )
    return {
        "name": sc.name,
        "header": header_line(result),
        "source": result.inputs["source"],
        "steps": sc.steps,
        "placement": sc.placement,
        "capacity_factor": sc.capacity.factor,
        "overflow": sc.capacity.overflow,
        "precision": sc.precision,
        "routing": routing,
        "model": (
            f"{shape.name}: {shape.num_layers} layers ({shape.num_moe_layers} MoE), d_model "
            f"{shape.d_model}, {shape.num_experts} routed experts (d_ff {shape.expert_d_ff}), "
            f"top-{shape.top_k}, {shape.num_shared_experts} shared; "
            f"{_params(shape.total_params())} parameters, {_params(shape.active_params())} active"
        ),
        "hardware": (
            f"{hw.name}: {hw.compute.bf16_dense_tflops:,.0f} TFLOP/s dense BF16, "
            f"{hw.memory.hbm_bytes / 1e9:.0f} GB HBM at {hw.memory.hbm_bandwidth_gbps:,.0f} GB/s; "
            f"scale-up {hw.scale_up.bandwidth_gbps:,.0f} GB/s per direction; scale-out "
            f"{hw.scale_out.bandwidth_gbps:,.0f} GB/s per device"
        ),
        "cluster": (
            f"{sc.cluster.nodes} node(s) × {sc.cluster.devices_per_node} devices = "
            f"{sc.cluster.num_devices} devices; {sc.placement} expert placement"
            f"{redundant}; {capacity}; "
            f"{tokens_per_device_text(sc.tokens_per_device, list(sc.modes))}; "
            f"{sc.precision} weights"
        ),
        "devices_per_node": sc.cluster.devices_per_node,
        "injected": injected_faults(result),
    }


@dataclass(frozen=True)
class RunData:
    """Everything one simulation's page shows."""

    info: dict[str, Any]
    summaries: list[dict[str, Any]]
    metrics: pd.DataFrame
    layers: pd.DataFrame
    phases: pd.DataFrame

    @classmethod
    def from_result(cls, result: SimResult) -> RunData:
        return cls(
            info=run_info(result),
            summaries=[r.summary for r in result.runs],
            metrics=metrics_frame(result),
            layers=pd.concat([r.layers for r in result.runs], ignore_index=True),
            phases=phases_frame(result),
        )

    def summary_json(self) -> str:
        return json.dumps({"info": self.info, "runs": self.summaries}, indent=1, sort_keys=True)

    @classmethod
    def load(cls, folder: Path) -> RunData:
        """Read a simulate output folder."""
        for name in RUN_FILES:
            if not (folder / name).is_file():
                raise InputError(
                    "not a simulate output folder (or written by an older moesim): "
                    f"{name} is missing",
                    file=folder,
                )
        try:
            data = json.loads((folder / "summary.json").read_text())
            info, runs = data["info"], data["runs"]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"unreadable: {err}", file=folder / "summary.json") from None
        frames = {
            n: pq.read_table(folder / f"{n}.parquet").to_pandas()
            for n in ("metrics", "layers", "phases")
        }
        return cls(info, runs, frames["metrics"], frames["layers"], frames["phases"])

    # ----- views ---------------------------------------------------------------------------
    @property
    def first_mode(self) -> str:
        return str(self.summaries[0]["mode"])

    def last_layers(self) -> pd.DataFrame:
        """Per MoE layer, first mode, last step."""
        lay = self.layers[self.layers["mode"] == self.first_mode]
        return lay[lay["step"] == lay["step"].max()].sort_values("layer")

    def last_metrics(self, pass_: str | None = "forward") -> pd.DataFrame:
        m = self.metrics[self.metrics["mode"] == self.first_mode]
        m = m[m["step"] == m["step"].max()]
        return m if pass_ is None else m[m["pass"] == pass_]


# ----- sections ---------------------------------------------------------------------------


def _answer(run: RunData) -> Section:
    cf = run.info["capacity_factor"]
    paras, md = [], []
    for s in run.summaries:
        b = s["breakdown_us"]
        routed = s["routed_balance"]
        worst = int(np.argmax(routed)) if routed else 0
        parts = ", ".join(
            f"{name} {fmt_us(b[k])}"
            for name, k in PARTS
            if k != "allreduce_us" or s["mode"] == "training"
        )
        text = (
            f"{s['mode']}: one step takes {fmt_us(s['step_time_us'])} "
            f"({s['tokens_per_s']:,.0f} tokens/s). On device {s['critical_device']}, which "
            f"finishes last: {parts}. "
        )
        if s["layers"]:
            text += (
                f"The worst MoE layer is {s['layers'][worst]}: its busiest device is routed "
                f"{routed[worst]:.3f}x the mean load ({s['processed_balance'][worst]:.3f}x "
                f"after drops); straggler device {s['straggler_device'][worst]} "
                f"({s['straggler_cause'][worst]}); "
            )
        text += (
            "dropless: every assignment is processed."
            if cf is None
            else f"{100 * s['drop_rate']:.3f}% of assignments are dropped at capacity factor "
            f"{cf} (tokens/s count processed assignments only)."
        )
        if "memory_per_device_bytes" in s:
            fits = "fits in" if s["memory_fits"] else "does NOT fit in"
            text += (
                f" Each device needs {fmt_bytes(s['memory_per_device_bytes'])}, which {fits} "
                f"its {fmt_bytes(s['hbm_bytes'])} of HBM."
            )
        paras.append(text)
        md.append(f"- **{text.split(':', 1)[0]}**:{text.split(':', 1)[1]}")
    import html as h

    warnings = report_warnings(run.summaries, run.info.get("injected", ""))
    body = "".join(f'<p class="warning"><strong>{h.escape(w)}</strong></p>' for w in warnings)
    body += "".join(f"<p>{h.escape(p)}</p>" for p in paras)
    md_warn = "".join(f"> **{w}**\n\n" for w in warnings)
    return Section("answer", body, md_warn + "\n".join(md))


def _cluster(run: RunData) -> Section:
    rows = [
        ("model", run.info["model"]),
        ("hardware", run.info["hardware"]),
        ("cluster", run.info["cluster"]),
        ("routing", run.info["routing"]),
    ]
    if run.info.get("injected"):
        rows.append(("injected slowness", run.info["injected"]))
    return Section("cluster", html_table(None, rows, left=2), md_table(None, rows, left=2))


_MEM_COLUMNS = (
    ("dense weights", "dense_weights_bytes"),
    ("expert weights", "expert_weights_bytes"),
    ("gradients + optimizer", "optimizer_bytes"),
    ("activations", "activation_bytes"),
    ("KV cache", "kv_cache_bytes"),
)


def memory_table(labels: list[str], breakdowns: list[dict[str, float]]) -> tuple[str, str]:
    header = ("", *(n for n, _ in _MEM_COLUMNS), "total", "HBM", "fits")
    rows = [
        (
            label,
            *(fmt_bytes(b[k]) for _, k in _MEM_COLUMNS),
            fmt_bytes(b["total_bytes"]),
            fmt_bytes(b["hbm_bytes"]),
            "yes" if b["total_bytes"] <= b["hbm_bytes"] else "NO",
        )
        for label, b in zip(labels, breakdowns, strict=True)
    ]
    return html_table(header, rows), md_table(header, rows)


MEMORY_NOTE = (
    "Dense weights are replicated on every device, routed experts split by expert "
    "parallelism; training adds bf16 gradients and fp32 Adam state (14 B per parameter) and "
    "every layer's activations; inference one layer's activations and the KV cache "
    "(assumptions: moesim/costs/memory.py)."
)


def _memory(run: RunData) -> Section:
    have = [s for s in run.summaries if "memory_breakdown_bytes" in s]
    if not have:
        return missing("memory", "This simulation's summary has no memory figures.")
    labels = [s["mode"] for s in have]
    bds = [s["memory_breakdown_bytes"] for s in have]
    th, tm = memory_table(labels, bds)
    svg = memory_svg(labels, bds, [b["hbm_bytes"] for b in bds])
    cap = (
        "Bytes one device holds in each mode, by component; black tick: HBM capacity (named "
        "above the bars when far off scale)."
    )
    return Section(
        "memory",
        figure(svg, cap) + th + f'<p class="muted">{MEMORY_NOTE}</p>',
        tm + "\n\n" + MEMORY_NOTE,
    )


def _breakdown(run: RunData) -> Section:
    labels = [s["mode"] for s in run.summaries]
    bds = [s["breakdown_us"] for s in run.summaries]
    header = ("mode", "step time", "tokens/s", "drop rate", *(n for n, _ in PARTS), "overlapped")
    rows = [
        (
            s["mode"],
            fmt_us(s["step_time_us"]),
            f"{s['tokens_per_s']:,.0f}",
            f"{100 * s['drop_rate']:.3f}%",
            *(fmt_us(s["breakdown_us"][k]) for _, k in PARTS),
            fmt_us(s["breakdown_us"].get("overlapped_us", 0.0)),
        )
        for s in run.summaries
    ]
    cap = (
        "Busy and waiting time of the device that finishes last in each mode; the segments add "
        "up to the step time, plus the overlapped time (counted twice where two streams ran at "
        "once: two-microbatch overlap, gradient buckets beside the backward pass)."
    )
    return Section(
        "breakdown",
        figure(breakdown_rows_svg(labels, bds), cap) + html_table(header, rows),
        md_table(header, rows),
    )


BALANCE_NOTE = (
    "Balance: max / mean load (1.0 is perfect). Experts: assignments routed to each "
    "logical expert; routed: to each device, after placement and replica choice, before "
    "capacity; processed: what each device processes after capacity drops. Capacity factor "
    "needed to drop nothing: the busiest expert slot's routed load over the mean slot load."
)


def balance_rows(run: RunData) -> list[tuple[object, ...]]:
    """Per MoE layer: expert, routed and processed balance, and the capacity factor that
    drops nothing."""
    return [
        (
            int(r["layer"]),
            f"{r['expert_balance']:.3f}",
            f"{r['routed_balance']:.3f}",
            f"{r['processed_balance']:.3f}",
            f"{r['dropless_capacity_factor']:.3f}",
            f"{int(r['max_device_load']):,} / {r['mean_device_load']:,.1f}",
            f"{int(r['dropped']):,}",
        )
        for r in run.last_layers().to_dict("records")
    ]


def _heatmap(run: RunData) -> Section:
    m = run.metrics[run.metrics["mode"] == run.first_mode]
    fwd = m[(m["pass"] == "forward") & (m["step"] == 0) & (m["device_load"] > 0)]
    if fwd.empty:
        return missing("heatmap", "No MoE layer processed any assignment.")
    lay = run.last_layers()
    header = (
        "layer",
        "expert balance",
        "routed balance",
        "processed balance",
        "capacity factor needed to drop nothing",
        "processed max / mean per device",
        "dropped",
    )
    rows = balance_rows(run)
    html = (
        figure(
            load_heatmap_svg(m),
            f"Assignments processed by each device in each MoE layer ({run.first_mode}, "
            "forward pass of step 0); circles mark the busiest device of each layer.",
        )
        + figure(balance_svg(lay), "Balance per MoE layer, before and after capacity.")
        + html_table(header, rows, left=0)
        + f'<p class="muted">{BALANCE_NOTE}</p>'
    )
    worst = lay.iloc[int(np.argmax(lay["routed_balance"].to_numpy()))]
    md = (
        f"Worst routed balance {worst['routed_balance']:.3f} in layer {int(worst['layer'])} "
        f"(processed {worst['processed_balance']:.3f}: max {int(worst['max_device_load']):,} "
        f"vs mean {worst['mean_device_load']:,.1f} assignments per device); the heatmap is "
        "in report.html.\n\n" + md_table(header, rows, left=0) + "\n\n" + BALANCE_NOTE
    )
    return Section("heatmap", html, md)


def _behind(r: dict[Any, Any], op: pd.DataFrame) -> str:
    """What lies behind a layer's straggler: its time on the op that added the most against
    that op's mean, with the op's bytes for a transfer, and its most loaded expert.
    ``op``: that op's phases rows (one per device), indexed by device; empty: none."""
    dev, cause = int(r["straggler_device"]), str(r["straggler_cause"])
    load = f"{int(r['straggler_load']):,} assignments (mean {r['mean_device_load']:,.1f})"
    if cause == "none" or dev not in op.index:
        return f"device {dev} processes {load}"
    row: dict[Any, Any] = op.loc[dev].to_dict()
    name = str(row["phase"])
    text = (
        f"its {name} op takes {fmt_us(float(row['duration_us']))} "
        f"(mean {fmt_us(float(op['duration_us'].mean()))})"
    )
    if str(row["category"]) in ("dispatch", "combine"):
        text += (
            f", sending {fmt_bytes(float(row['bytes_sent']))} (mean "
            f"{fmt_bytes(float(op['bytes_sent'].mean()))}) and receiving "
            f"{fmt_bytes(float(row['bytes_recv']))} (mean "
            f"{fmt_bytes(float(op['bytes_recv'].mean()))})"
        )
    if r["straggler_expert"] >= 0:
        text += (
            f"; its busiest expert {int(r['straggler_expert'])} has "
            f"{r['straggler_expert_tokens']:,.0f} of its {int(r['straggler_load']):,} "
            f"assignments (mean per device {r['mean_device_load']:,.1f})"
        )
    return text


def straggler_rows(run: RunData) -> list[tuple[object, ...]]:
    """Per MoE layer: the straggler on the critical path, its cause, the time it adds, the
    device that finishes the layer last, the penalty of the cause's phase and what lies
    behind it (the straggler's time and bytes on its costliest op, its busiest expert)."""
    lay = run.last_layers()
    ph = run.phases[(run.phases["mode"] == run.first_mode) & (run.phases["pass"] == "forward")]
    ph = ph[ph["step"] == lay["step"].max()] if not lay.empty else ph
    rows: list[tuple[object, ...]] = []
    for r in lay.to_dict("records"):
        op = ph[
            (ph["layer"] == r["layer"])
            & (ph["phase"] == r["straggler_op_phase"])
            & (ph["microbatch"] == r["straggler_op_microbatch"])
        ].set_index("device")
        phase = PHASE_NAMES.get(str(r["straggler_phase"]), str(r["straggler_phase"]))
        rows.append(
            (
                int(r["layer"]),
                int(r["straggler_device"]),
                str(r["straggler_cause"]),
                fmt_us(float(r["straggler_excess_us"])),
                int(r["last_device"]),
                f"{100 * r['straggler_penalty']:.1f}% ({phase})",
                _behind(r, op),
            )
        )
    return rows


STRAGGLER_NOTE = (
    "Straggler: the device on the critical path whose late finish the next layer's start "
    "waited for. The path is walked back from the device that finishes the layer last "
    "(last to finish), through every wait for another device; each op on it is charged "
    "its time beyond the mean of that op over all devices, and the straggler is the device "
    "charged most (time added). Cause: the kind of its most charged op: expert or other "
    "compute, sending or receiving (whichever moves more bytes), a slow NIC or link (a "
    "degraded NIC, or a flow-tier transfer slower than any healthy port allows), a slow "
    "device or jitter (injected slowness outweighing its own load); none: a balanced layer. "
    "Penalty: (max − mean) / mean of per-device time in the phase of that op."
)


def _stragglers(run: RunData) -> Section:
    header = (
        "layer",
        "straggler device",
        "cause",
        "time added",
        "last to finish",
        "penalty (phase)",
        "behind it",
    )
    rows = straggler_rows(run)
    if not rows:
        return missing("stragglers", "No MoE layer in this simulation.")
    injected = run.info.get("injected")
    note = f"{run.first_mode}, forward pass, last step. " + STRAGGLER_NOTE
    if injected:
        note += f" Injected slowness: {injected}."
    return Section(
        "stragglers",
        html_table(header, rows, left=0, text_cols=(2, 6)) + f'<p class="muted">{note}</p>',
        md_table(header, rows, left=0) + "\n\n" + note,
    )


#: sent and received bytes this close on every device are drawn as one series
SAME_BYTES_RTOL = 1e-3


def _links(run: RunData) -> Section:
    m = run.last_metrics(None)
    per_dev = m.groupby("device")[["bytes_sent", "bytes_recv"]].sum().sort_index()
    if float(per_dev.to_numpy().sum()) <= 0:
        return missing("links", "No device sent any bytes (a single device, or no MoE layer).")
    lay = run.last_layers()
    dpn = int(run.info["devices_per_node"])
    top = lay.sort_values(["busiest_pair_bytes", "layer"], ascending=[False, True]).head(8)
    header = ("layer", "busiest flow", "fabric", "bytes (dispatch + its combine)")
    rows = [
        (
            int(r["layer"]),
            f"{int(r['busiest_pair_src'])} → {int(r['busiest_pair_dst'])}",
            "scale-out (NICs)"
            if int(r["busiest_pair_src"]) // dpn != int(r["busiest_pair_dst"]) // dpn
            else "scale-up",
            fmt_bytes(r["busiest_pair_bytes"]),
        )
        for r in top.to_dict("records")
        if "busiest_pair_bytes" in r
    ]
    moved = (per_dev["bytes_sent"] + per_dev["bytes_recv"]).to_numpy()
    busiest = int(per_dev.index.to_numpy()[int(np.argmax(moved))])
    sent, recv = per_dev["bytes_sent"].to_numpy(), per_dev["bytes_recv"].to_numpy()
    same = bool(np.allclose(sent, recv, rtol=SAME_BYTES_RTOL, atol=0.0))
    cap = (
        f"Bytes each device's port sends and receives in one {run.first_mode} step (all layers "
        f"and passes); device {busiest} moves the most."
    )
    if same:
        cap += " Every device receives what it sends (within 0.1 %), so one series shows both."
    html = figure(port_bytes_svg(sent, None if same else recv), cap)
    html += "<p>Busiest device pair of each layer (top 8):</p>" + html_table(
        header, rows, left=0, text_cols=(2,)
    )
    md = (
        f"Device {busiest} moves the most bytes per step "
        f"({fmt_bytes(float(moved.max()))}).\n\n" + md_table(header, rows, left=0)
    )
    if "busiest_link" in lay and (lay["busiest_link"].fillna("") != "").any():
        links = lay[lay["busiest_link"].fillna("") != ""]
        links = links.sort_values(["busiest_link_us", "layer"], ascending=[False, True]).head(8)
        lheader = ("layer", "fabric link", "dispatch bytes", "time at its bandwidth")
        lrows = [
            (
                int(r["layer"]),
                str(r["busiest_link"]),
                fmt_bytes(float(r["busiest_link_bytes"])),
                fmt_us(float(r["busiest_link_us"])),
            )
            for r in links.to_dict("records")
        ]
        html += "<p>Busiest fabric link of each layer's dispatch (top 8):</p>" + html_table(
            lheader, lrows, left=0, text_cols=(1,)
        )
        md += "\n\nBusiest fabric links (dispatch):\n\n" + md_table(lheader, lrows, left=0)
    else:
        note = "<p>Per-link loads are computed for clusters of up to 256 devices.</p>"
        html += note
    return Section("links", html, md)


def _timeline(run: RunData) -> Section:
    ph = run.phases[(run.phases["mode"] == run.first_mode) & (run.phases["step"] == 0)]
    ph = ph[(ph["pass"] == "forward") & (ph["layer"] >= 0)]
    lay = run.last_layers()
    if ph.empty or lay.empty:
        return missing("timeline", "No per-phase records of a MoE layer.")
    worst = lay.iloc[int(np.argmax(lay["straggler_excess_us"].to_numpy()))]
    layer, strag = int(worst["layer"]), int(worst["straggler_device"])
    ph = ph[ph["layer"] == layer]
    devices = sorted(ph["device"].unique())
    shown = devices[:TIMELINE_DEVICES]
    if strag not in shown:
        shown = [*shown[: TIMELINE_DEVICES - 1], strag]
    ph = ph[ph["device"].isin(shown)]
    cap = (
        f"MoE layer {layer} (the straggler adding the most time), forward pass of step 0, "
        f"{run.first_mode}; devices {', '.join(map(str, shown[:4]))}"
        f"{'…' if len(shown) > 4 else ''} ({len(shown)} of {len(devices)}), straggler device "
        f"{strag} ({worst['straggler_cause']}). `moesim simulate` writes the full timeline as "
        "timeline.json (open it in Perfetto or chrome://tracing)."
    )
    md = cap
    return Section("timeline", figure(timeline_svg(ph), cap), md)


def run_sections(run: RunData, *, answer: bool = True) -> list[Section]:
    """Every section of a simulation's page (sections a single run cannot fill say so)."""
    cf = run.info["capacity_factor"]
    sections = [
        _cluster(run),
        _memory(run),
        _breakdown(run),
        _heatmap(run),
        _stragglers(run),
        missing(
            "drops",
            f"One capacity factor in a single run ({'unlimited' if cf is None else cf}: "
            f"{100 * run.summaries[0]['drop_rate']:.3f}% dropped); run a sweep over "
            "capacity.factor to compare.",
        ),
        missing(
            "placement",
            f"One placement in a single run ({run.info['placement']}); run a sweep over "
            "placement to compare.",
        ),
        missing(
            "scaling",
            "One cluster size in a single run; run a sweep over cluster.nodes to compare.",
        ),
        _links(run),
        _timeline(run),
    ]
    return [_answer(run), *sections] if answer else sections
