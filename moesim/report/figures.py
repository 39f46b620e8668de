"""Report figures as inline SVG strings (matplotlib, deterministic output)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moesim.report.summary import PARTS
from moesim.sim.simulate import SimResult

__all__ = ["balance_svg", "breakdown_svg", "load_heatmap_svg"]

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
    return text[text.index("<svg") :]


def breakdown_svg(result: SimResult) -> str:
    """Stacked horizontal bar of each mode's step time by phase, in milliseconds."""
    runs = result.runs
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.6 * len(runs)))
    for row, run in enumerate(runs):
        left = 0.0
        for name, key in PARTS:
            w = run.summary["breakdown_us"][key] / 1e3
            ax.barh(row, w, left=left, color=_COLORS[name], label=name if row == 0 else None)
            left += w
    ax.set_yticks(range(len(runs)), [r.mode for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel("time on the device that finishes last (ms)")
    ax.legend(
        ncol=3,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.45 if len(runs) < 3 else -0.25),
        frameon=False,
        fontsize=8,
    )
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def balance_svg(layers: pd.DataFrame) -> str:
    """Balance ratio (max/mean device load) per MoE layer."""
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    ax.bar(layers["layer"].astype(str), layers["balance_ratio"], color="#4C72B0")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("MoE layer (model layer index)")
    ax.set_ylabel("balance ratio (max / mean)")
    ax.set_ylim(0.9, max(1.1, float(layers["balance_ratio"].max()) * 1.05))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def load_heatmap_svg(metrics: pd.DataFrame) -> str:
    """Assignments per device per MoE layer (forward pass of step 0), as a heatmap."""
    fwd = metrics[
        (metrics["pass"] == "forward") & (metrics["step"] == 0) & (metrics["device_load"] > 0)
    ]
    grid = fwd.pivot_table(index="layer", columns="device", values="device_load", aggfunc="sum")
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.32 * len(grid)))
    im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(grid)), [str(x) for x in grid.index])
    ax.set_xticks(range(grid.shape[1]), [str(x) for x in grid.columns], fontsize=7)
    ax.set_xlabel("device")
    ax.set_ylabel("MoE layer")
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label("assignments")
    row_max = np.argmax(grid.to_numpy(), axis=1)
    ax.scatter(row_max, range(len(grid)), marker="o", facecolors="none", edgecolors="white", s=40)
    return _svg(fig)
