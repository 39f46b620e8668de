"""Write a simulation's outputs: metrics.parquet, timeline.json, summary.md, report.html."""

from __future__ import annotations

import io
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim import __version__
from moesim.fileio import atomic_write_bytes
from moesim.report.figures import balance_svg, breakdown_svg, load_heatmap_svg
from moesim.report.summary import fmt_us, header_line, markdown_summary
from moesim.report.timeline import timeline_json
from moesim.sim.engine import Exchange
from moesim.sim.simulate import SimResult

__all__ = ["metrics_frame", "phases_frame", "render_html", "write_outputs"]


def phases_frame(result: SimResult) -> pd.DataFrame:
    """One row per (mode, step, pass, layer, device, phase): every op of the engine with its
    start, wait and busy time, for transfers the bytes sent and received, and the layer's
    tokens (assignments processed) and dropped assignments on that device."""
    frames = []
    for run in result.runs:
        for step, rec in enumerate(run.records):
            d = rec.start_us.shape[1]
            op_rows = []
            for i, op in enumerate(run.program):
                sent: np.ndarray | float = 0.0
                recv: np.ndarray | float = 0.0
                if isinstance(op, Exchange) and op.sent_bytes.size:
                    sent, recv = op.sent_bytes, op.recv_bytes
                op_rows.append(
                    pd.DataFrame(
                        {
                            "mode": run.mode,
                            "step": step,
                            "pass": op.pass_,
                            "layer": op.layer,
                            "device": np.arange(d),
                            "phase": op.name.split(" ", 1)[-1] if op.layer >= 0 else op.name,
                            "category": op.category,
                            "start_us": rec.start_us[i],
                            "wait_us": rec.wait_us[i],
                            "duration_us": rec.duration_us[i],
                            "bytes_sent": sent,
                            "bytes_recv": recv,
                        }
                    )
                )
            frames.append(pd.concat(op_rows, ignore_index=True))
    keys = ["mode", "step", "pass", "layer", "device"]
    loads = metrics_frame(result)[[*keys, "device_load", "dropped"]]
    return pd.concat(frames, ignore_index=True).merge(loads, on=keys, how="left")


def metrics_frame(result: SimResult) -> pd.DataFrame:
    """All modes' metrics: one row per (mode, step, pass, layer, device)."""
    return pd.concat([r.metrics for r in result.runs], ignore_index=True)


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def render_html(result: SimResult) -> str:
    sc, shape, hw = result.scenario, result.shape, result.hw
    summaries = []
    for run in result.runs:
        s, b = run.summary, run.summary["breakdown_us"]
        worst = max(range(len(s["layers"])), key=lambda i: s["balance_ratio"][i])
        summaries.append(
            {
                "mode": s["mode"],
                "step_time": fmt_us(s["step_time_us"]),
                "tokens_per_s": f"{s['tokens_per_s']:,.0f}",
                "expert": fmt_us(b["expert_us"]),
                "dispatch": fmt_us(b["dispatch_us"]),
                "combine": fmt_us(b["combine_us"]),
                "allreduce": fmt_us(b["allreduce_us"]),
                "overlapped": fmt_us(b["overlapped_us"]),
                "other": fmt_us(b["other_us"]),
                "wait": fmt_us(b["wait_us"]),
                "critical_device": s["critical_device"],
                "worst_layer": s["layers"][worst],
                "worst_balance": f"{s['balance_ratio'][worst]:.3f}",
                "worst_device": s["straggler_device"][worst],
                "drop_rate": f"{100 * s['drop_rate']:.3f}%",
            }
        )
    first = result.runs[0]
    lay = first.layers[first.layers["step"] == sc.steps - 1].sort_values("layer")
    layer_rows = [
        {
            "layer": int(r["layer"]),
            "balance": f"{r['balance_ratio']:.3f}",
            "device": int(r["straggler_device"]),
            "penalty": f"{100 * r['straggler_penalty']:.1f}%",
            "loads": f"{int(r['max_device_load']):,} / {r['mean_device_load']:,.1f}",
            "dropped": f"{int(r['dropped']):,}",
        }
        for r in lay.to_dict("records")
    ]
    routing = (
        f"trace {sc.routing.trace} ({result.inputs['trace_tokens']:,} tokens, trace layers "
        f"{result.inputs['trace_layers']} replayed on MoE layers {result.inputs['moe_layers']})"
        if sc.routing.trace is not None
        else f"synthetic: {sc.routing.synthetic}"
    )
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("moesim.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    tmpl = env.get_template("report.html.j2")
    return tmpl.render(
        name=sc.name,
        header=header_line(result),
        summaries=summaries,
        capacity_factor=sc.capacity.factor if sc.capacity.factor is not None else "unlimited",
        model={
            "name": shape.name,
            "layers": shape.num_layers,
            "moe_layers": shape.num_moe_layers,
            "d_model": shape.d_model,
            "experts": shape.num_experts,
            "expert_d_ff": shape.expert_d_ff,
            "top_k": shape.top_k,
            "shared": shape.num_shared_experts,
            "total": _params(shape.total_params()),
            "active": _params(shape.active_params()),
        },
        hw={
            "name": hw.name,
            "bf16": f"{hw.compute.bf16_dense_tflops:,.0f}",
            "hbm": f"{hw.memory.hbm_bytes / 1e9:.0f} GB",
            "hbm_bw": f"{hw.memory.hbm_bandwidth_gbps:,.0f}",
            "up": f"{hw.scale_up.bandwidth_gbps:,.0f}",
            "out": f"{hw.scale_out.bandwidth_gbps:,.0f}",
        },
        cluster=(
            f"{sc.cluster.nodes} node(s) × {sc.cluster.devices_per_node} devices = "
            f"{sc.cluster.num_devices} devices; {sc.placement} expert placement"
        ),
        routing=routing,
        fig_breakdown=jinja2.utils.markupsafe.Markup(breakdown_svg(result)),
        fig_balance=jinja2.utils.markupsafe.Markup(balance_svg(lay)),
        fig_heatmap=jinja2.utils.markupsafe.Markup(load_heatmap_svg(first.metrics)),
        layer_rows=layer_rows,
        version=__version__,
        source=result.inputs["source"],
    )


def write_outputs(result: SimResult, out_dir: str | Path) -> dict[str, Path]:
    """Render everything in memory first, then write each file atomically."""
    out_dir = Path(out_dir)
    payload = {
        "metrics.parquet": _parquet_bytes(metrics_frame(result)),
        "phases.parquet": _parquet_bytes(phases_frame(result)),
        "timeline.json": timeline_json(result).encode(),
        "summary.md": markdown_summary(result).encode(),
        "report.html": render_html(result).encode(),
    }
    return {name: atomic_write_bytes(out_dir / name, data) for name, data in payload.items()}
