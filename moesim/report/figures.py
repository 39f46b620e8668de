"""Report figures as inline SVG strings (matplotlib, deterministic output)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moesim.report.summary import PARTS
from moesim.sim.simulate import SimResult

__all__ = [
    "balance_svg",
    "breakdown_rows_svg",
    "breakdown_svg",
    "drop_vs_capacity_svg",
    "load_heatmap_svg",
    "memory_svg",
    "placement_svg",
    "port_bytes_svg",
    "scaling_svg",
    "timeline_svg",
]

_COLORS = {
    "expert compute": "#4C72B0",
    "dispatch": "#DD8452",
    "combine": "#55A868",
    "gradient all-reduce": "#8172B3",
    "other": "#8C8C8C",
    "waiting": "#C44E52",
}


def _svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    with plt.rc_context({"svg.hashsalt": "moesim", "svg.fonttype": "none"}):
        fig.savefig(
            buf, format="svg", metadata={"Date": None, "Creator": "moesim"}, bbox_inches="tight"
        )
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    if "<metadata>" in text:  # the RDF block names external vocabularies; the page needs none
        text = text[: text.index("<metadata>")] + text[text.index("</metadata>") + 11 :]
    return text


def _legend_above(ax: Any) -> None:
    """One row of legend entries just above the axes, out of the data's way."""
    ax.legend(
        ncol=6,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
        fontsize=8,
        handlelength=1.2,
        columnspacing=1.0,
    )


def breakdown_svg(result: SimResult) -> str:
    """Stacked horizontal bar of each mode's step time by phase, in milliseconds."""
    return breakdown_rows_svg(
        [r.mode for r in result.runs], [r.summary["breakdown_us"] for r in result.runs]
    )


def breakdown_rows_svg(labels: list[str], breakdowns: list[dict[str, float]]) -> str:
    """Stacked horizontal bars, one per label, of time by phase (``*_us`` keys), in ms."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(7.5, 1.3 + 0.32 * n))
    for row, b in enumerate(breakdowns):
        left = 0.0
        for name, key in PARTS:
            w = float(b.get(key) or 0.0) / 1e3
            ax.barh(row, w, left=left, color=_COLORS[name], label=name if row == 0 else None)
            left += w
    ax.set_yticks(range(n), labels, fontsize=8 if n > 6 else 10)
    ax.invert_yaxis()
    ax.set_xlabel("time on the device that finishes last (ms)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


#: the balance figures of a layer (``layers`` columns), as the report names them
BALANCE_SERIES = (
    ("expert_balance", "experts, before capacity", "#DD8452"),
    ("routed_balance", "devices, before capacity", "#4C72B0"),
    ("processed_balance", "devices, after drops", "#55A868"),
)


def balance_svg(layers: pd.DataFrame) -> str:
    """Balance (max / mean load) per MoE layer: of logical experts and of devices before
    capacity, and of devices after drops, side by side."""
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    x = np.arange(len(layers))
    width = 0.8 / len(BALANCE_SERIES)
    top = 1.1
    for k, (col, label, color) in enumerate(BALANCE_SERIES):
        vals = layers[col].to_numpy(dtype=float)
        ax.bar(x + (k - 1) * width, vals, width, color=color, label=label)
        top = max(top, float(vals.max()) * 1.05) if vals.size else top
    step = -(-len(layers) // 16)  # at most 16 labels
    ax.set_xticks(x[::step], [str(v) for v in layers["layer"].to_numpy()[::step]])
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("MoE layer (model layer index)")
    ax.set_ylabel("balance (max / mean load)")
    ax.set_ylim(0.9, top)
    ax.legend(fontsize=7, frameon=False, loc="upper left", ncols=3)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def load_heatmap_svg(metrics: pd.DataFrame) -> str:
    """Assignments per device per MoE layer (forward pass of step 0), as a heatmap."""
    fwd = metrics[
        (metrics["pass"] == "forward") & (metrics["step"] == 0) & (metrics["device_load"] > 0)
    ]
    grid = fwd.pivot_table(index="layer", columns="device", values="device_load", aggfunc="sum")
    fig, ax = plt.subplots(figsize=(7.5, min(1.2 + 0.32 * len(grid), 7.0)))
    im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ys = -(-len(grid) // 20)  # at most 20 layer labels and 24 device labels
    xs = -(-grid.shape[1] // 24)
    ax.set_yticks(range(0, len(grid), ys), [str(x) for x in grid.index[::ys]], fontsize=8)
    ax.set_xticks(range(0, grid.shape[1], xs), [str(x) for x in grid.columns[::xs]], fontsize=7)
    ax.set_xlabel("device")
    ax.set_ylabel("MoE layer")
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label("assignments")
    row_max = np.argmax(grid.to_numpy(), axis=1)
    ax.scatter(row_max, range(len(grid)), marker="o", facecolors="none", edgecolors="white", s=40)
    return _svg(fig)


_MEMORY_PARTS = (
    ("dense weights", "dense_weights_bytes", "#4C72B0"),
    ("expert weights", "expert_weights_bytes", "#55A868"),
    ("gradients + optimizer", "optimizer_bytes", "#8172B3"),
    ("activations", "activation_bytes", "#DD8452"),
    ("KV cache", "kv_cache_bytes", "#937860"),
)
_MEMORY_TOTAL = (("memory per device", "total_bytes", "#8C8C8C"),)


def memory_svg(
    labels: list[str], breakdowns: list[dict[str, float]], hbm_bytes: list[float]
) -> str:
    """Stacked horizontal bars of bytes per device by component, each row with a tick at its
    device's HBM capacity. When every total is under a tenth of its HBM, the axis fits the
    totals (in MB or GB) and the capacity is written in the title instead."""
    n = len(labels)
    totals = [
        sum(float(b.get(k, 0.0)) for _, k, _ in _MEMORY_PARTS) or float(b.get("total_bytes", 0.0))
        for b in breakdowns
    ]
    known = [h for h in hbm_bytes if h == h]  # not NaN
    small = bool(known) and all(
        t < 0.1 * h for t, h in zip(totals, hbm_bytes, strict=True) if h == h
    )
    scale, unit = (1e9, "GB") if not small or max(totals) >= 1e9 else (1e6, "MB")
    fig, ax = plt.subplots(figsize=(7.5, 1.3 + 0.32 * n))
    for row, b in enumerate(breakdowns):
        left = 0.0
        parts = _MEMORY_PARTS if any(k in b for _, k, _ in _MEMORY_PARTS) else _MEMORY_TOTAL
        for name, key, color in parts:
            w = float(b.get(key, 0.0)) / scale
            ax.barh(row, w, left=left, color=color, label=name if row == 0 else None)
            left += w
        if not small and hbm_bytes[row] == hbm_bytes[row]:
            ax.plot(
                [hbm_bytes[row] / scale] * 2,
                [row - 0.45, row + 0.45],
                color="black",
                lw=2,
                label="HBM capacity" if row == 0 else None,
            )
    ax.set_yticks(range(n), labels, fontsize=8 if n > 6 else 10)
    ax.invert_yaxis()
    ax.set_xlabel(f"memory per device ({unit}, 10^{9 if unit == 'GB' else 6} bytes)")
    if small:
        ax.set_title(
            f"far below HBM capacity ({max(known) / 1e9:.0f} GB per device)", fontsize=9, pad=24
        )
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def drop_vs_capacity_svg(df: pd.DataFrame, group: str) -> str:
    """Drop rate (%) against capacity factor, one line per value of ``group``.

    ``df``: columns ``capacity_factor``, ``drop_rate`` and ``group``.
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for name, g in df.groupby(group, sort=True):
        g = g.sort_values("capacity_factor")
        ax.plot(g["capacity_factor"], 100 * g["drop_rate"], marker="o", label=str(name))
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("dropped assignments (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    n = df[group].nunique()
    ax.legend(  # below the axes, so no line or tick label is covered
        fontsize=8,
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=1 if n > 4 else n,
        title="other axes" if n > 1 else None,
        title_fontsize=8,
    )
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def placement_svg(df: pd.DataFrame) -> str:
    """Mean step time (ms) per placement strategy; ``df``: ``placement``, ``step_time_us``."""
    g = df.groupby("placement", sort=True)["step_time_us"].mean() / 1e3
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.4 * len(g)))
    ax.barh(range(len(g)), g.to_numpy(), color="#4C72B0")
    ax.set_yticks(range(len(g)), [str(x) for x in g.index])
    ax.invert_yaxis()
    ax.set_xlabel("mean step time over the cases with that placement (ms)")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def scaling_svg(df: pd.DataFrame, group: str) -> str:
    """Tokens/s against devices, one line per ``group`` value, with ideal (linear) scaling
    from each line's smallest cluster as a dashed line of the same colour."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (name, g) in enumerate(df.groupby(group, sort=True)):
        best = g.groupby("num_devices", sort=True)["tokens_per_s"].max()
        color = f"C{i % 10}"
        x, y = best.index.to_numpy(dtype=float), best.to_numpy(dtype=float)
        ax.plot(x, y, marker="o", color=color, label=f"{name} (simulated)")
        ax.plot(x, y[0] * x / x[0], ls="--", color=color, alpha=0.6, label=f"{name} (ideal)")
    devices = sorted({int(x) for x in df["num_devices"]})
    step = -(-len(devices) // 12)
    ax.set_xticks(devices[::step], [str(x) for x in devices[::step]])
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}k" if v else "0")
    )
    ax.set_xlabel("devices")
    ax.set_ylabel("throughput (tokens/s, k = 1,000)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def port_bytes_svg(sent: np.ndarray, recv: np.ndarray | None) -> str:
    """Bytes each device sends and receives through its ports in one step (MB); with
    ``recv`` None, one series: every device receives what it sends."""
    d = np.arange(sent.size)
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    series = [("sent", sent, "#DD8452", "-")]
    if recv is None:
        series = [("sent = received", sent, "#4C72B0", "-")]
    else:
        series.append(("received", recv, "#55A868", "--"))
    width = 0.8 / len(series)
    for i, (label, values, color, ls) in enumerate(series):
        if sent.size <= 32:
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar(d + offset, values / 1e6, width=width, color=color, label=label)
        else:  # too many devices for bars: one line each
            ax.plot(d, values / 1e6, color=color, lw=1.2, ls=ls, label=label)
    if sent.size > 32:
        ax.set_ylim(bottom=0)
    step = -(-sent.size // 24)
    ax.set_xticks(d[::step], [str(x) for x in d[::step]], fontsize=7)
    ax.set_xlabel("device")
    ax.set_ylabel("bytes per step (MB)")
    ax.legend(fontsize=8, frameon=False, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


_CATEGORY_COLORS = {
    "expert": _COLORS["expert compute"],
    "dispatch": _COLORS["dispatch"],
    "combine": _COLORS["combine"],
    "allreduce": _COLORS["gradient all-reduce"],
    "other": _COLORS["other"],
}


def timeline_svg(phases: pd.DataFrame) -> str:
    """Gantt chart of one layer's ops per device (µs from the layer's first op).

    ``phases``: rows of :func:`moesim.report.frames.phases_frame` for one (mode, step, pass,
    layer) and a few devices.
    """
    t0 = float((phases["start_us"] - phases["wait_us"]).min())
    devices = sorted(phases["device"].unique())
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.28 * len(devices)))
    seen: set[str] = set()
    for row, dev in enumerate(devices):
        for r in phases[phases["device"] == dev].itertuples(index=False):
            start = float(r.start_us) - t0
            if r.wait_us > 0:
                ax.barh(
                    row,
                    r.wait_us,
                    left=start - r.wait_us,
                    color="#F2C4C4",
                    height=0.7,
                    label=None if "waiting" in seen else "waiting",
                )
                seen.add("waiting")
            if r.duration_us > 0:
                cat = str(r.category)
                label = {"expert": "expert compute", "allreduce": "gradient all-reduce"}.get(
                    cat, cat
                )
                ax.barh(
                    row,
                    r.duration_us,
                    left=start,
                    color=_CATEGORY_COLORS.get(cat, "#8C8C8C"),
                    height=0.7,
                    edgecolor="white",
                    linewidth=0.3,
                    label=None if label in seen else label,
                )
                seen.add(label)
    ax.set_yticks(range(len(devices)), [f"device {d}" for d in devices], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time from the layer's first op (µs)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)
