"""The report of a sweep results folder (``results.parquet``, see ``moesim sweep``).

A sweep keeps one row of headline figures per case, so its page compares cases: memory per
device, step-time breakdown, drop rate against capacity factor, placements, throughput
against devices with ideal scaling, and the cases with the largest straggler penalty and
cross-node traffic. Per-device detail (heatmap, timeline) needs a simulation of one case.
"""

from __future__ import annotations

import html as html_lib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from moesim.errors import InputError
from moesim.fileio import write_output_folder
from moesim.report.figures import (
    breakdown_rows_svg,
    drop_vs_capacity_svg,
    memory_svg,
    placement_svg,
    scaling_svg,
)
from moesim.report.page import (
    Section,
    figure,
    html_table,
    md_table,
    missing,
    render_markdown,
    render_page,
)
from moesim.report.summary import PARTS, fmt_bytes, fmt_us

__all__ = [
    "REQUIRED_COLUMNS",
    "case_labels",
    "read_results",
    "results_sections",
    "within_budget",
    "write_sweep_report",
]

REQUIRED_COLUMNS = (
    "case_index",
    "status",
    "axes",
    "hardware",
    "model",
    "mode",
    "num_devices",
    "capacity_factor",
    "step_time_us",
    "tokens_per_s",
)
MAX_ROWS = 30
_CF_KEYS = ("capacity.factor", "capacity_factor")


def read_results(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The results table (sorted by case_index) and sweep.json (empty when absent)."""
    path = folder / "results.parquet"
    if not path.is_file():
        raise InputError("not a sweep results folder: results.parquet is missing", file=folder)
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise InputError(f"unreadable Parquet file: {err}", file=path) from None
    lacking = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if lacking:
        raise InputError("results table lacks a column", file=path, field=lacking[0])
    meta: dict[str, Any] = {}
    if (folder / "sweep.json").is_file():
        try:
            meta = json.loads((folder / "sweep.json").read_text())
        except ValueError as err:
            raise InputError(f"unreadable: {err}", file=folder / "sweep.json") from None
    return df.sort_values("case_index", kind="stable").reset_index(drop=True), meta


def _axes(row: pd.Series) -> dict[str, Any]:
    try:
        value = json.loads(row["axes"]) if isinstance(row["axes"], str) else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def _axis_text(key: str, value: Any) -> str:
    if value is None:
        return "dropless" if key in _CF_KEYS else "null"
    return str(value)


def case_labels(df: pd.DataFrame, drop: tuple[str, ...] = ()) -> list[str]:
    """A short label per case: its axis values (``key=value``, last part of the dotted path)."""
    out = []
    for _, row in df.iterrows():
        axes = {k: v for k, v in _axes(row).items() if k not in drop}
        text = ", ".join(
            f"{k.rsplit('.', 1)[-1]}={_axis_text(k, v)}" for k, v in sorted(axes.items())
        )
        out.append(text or f"case {int(row['case_index'])}")
    return out


def _hbm_bytes(hardware: str) -> float:
    from moesim.hardware import get_profile

    try:
        return float(get_profile(hardware).memory.hbm_bytes)
    except InputError:
        return float("nan")


def _num(x: Any) -> float:
    return float(x) if x is not None and not pd.isna(x) else float("nan")


def _drop(row: pd.Series | dict[str, Any]) -> float:
    """A case's drop rate (0 when the results lack the column or the figure)."""
    v = _num(row.get("drop_rate"))
    return 0.0 if np.isnan(v) else v


def within_budget(df: pd.DataFrame, max_drop_rate: float) -> pd.DataFrame:
    """The cases whose drop rate is within the budget (a missing figure counts as 0)."""
    if "drop_rate" not in df:
        return df
    return df[df["drop_rate"].fillna(0.0) <= max_drop_rate + 1e-12]


def _budget_text(max_drop_rate: float) -> str:
    return (
        "dropless cases only (no drop budget)"
        if max_drop_rate == 0
        else f"cases dropping at most {100 * max_drop_rate:g}% of assignments"
    )


def _answer(
    ok: pd.DataFrame, failed: pd.DataFrame, meta: dict[str, Any], max_drop_rate: float = 0.0
) -> Section:
    if ok.empty:
        return Section(
            "answer",
            f"<p>No case finished ({len(failed)} failed).</p>",
            f"No case finished ({len(failed)} failed).",
        )
    lines = [
        f"{len(ok) + len(failed)} cases, {len(ok)} finished"
        + (f", {len(failed)} failed (listed below)" if len(failed) else "")
        + "."
    ]
    labels = dict(zip(ok.index, case_labels(ok), strict=True))
    over = len(ok) - len(within_budget(ok, max_drop_rate))
    lines.append(
        f"Best answers below: {_budget_text(max_drop_rate)}"
        + (
            f"; {over} case(s) over the drop budget are left out of them (set max_drop_rate "
            "in the sweep file to admit them)"
            if over
            else ""
        )
        + ". Tokens/s count processed assignments only."
    )
    for (hw, mode), g0 in ok.groupby(["hardware", "mode"], sort=True):
        g = within_budget(g0, max_drop_rate)
        if g.empty:
            lines.append(
                f"{mode} on {hw}: every case drops more than the budget "
                f"(least: {100 * float(g0['drop_rate'].min()):.3f}%); no answer."
            )
            continue
        best = g.iloc[int(np.argmax(g["tokens_per_s"].to_numpy()))]
        text = (
            f"{mode} on {hw}: the highest throughput is {best['tokens_per_s']:,.0f} tokens/s "
            f"at {100 * _drop(best):.3f}% dropped ({labels[best.name]}: "
            f"{int(best['num_devices'])} devices, step time {fmt_us(best['step_time_us'])}"
        )
        mem = _num(best.get("memory_per_device_bytes"))
        if not np.isnan(mem):
            hbm = _hbm_bytes(str(hw))
            fit = "" if np.isnan(hbm) else (" (fits)" if mem <= hbm else " (does NOT fit in HBM)")
            text += f", {fmt_bytes(mem)} per device{fit}"
        lines.append(text + ").")
    if len(failed):
        errs = [f"case {int(r['case_index'])}: {r.get('error')}" for _, r in failed.iterrows()]
        lines.append("Failed: " + "; ".join(errs[:5]) + ("; …" if len(errs) > 5 else ""))
    if meta.get("sweep_id"):
        lines.append(f"Sweep {str(meta['sweep_id'])[:16]}.")
    body = "".join(f"<p>{html_lib.escape(s)}</p>" for s in lines)
    return Section("answer", body, "\n\n".join(lines))


def _cluster(df: pd.DataFrame) -> Section:
    rows = []
    for col, name in (
        ("model", "models"),
        ("hardware", "hardware"),
        ("mode", "modes"),
        ("num_devices", "devices"),
        ("nodes", "nodes"),
        ("devices_per_node", "devices per node"),
        ("tokens_per_device", "tokens per device"),
        ("capacity_factor", "capacity factors"),
        ("placement", "placements"),
    ):
        if col in df:
            vals = sorted(
                {("unlimited" if pd.isna(v) else v) for v in df[col]},
                key=lambda v: (1, str(v), 0.0) if isinstance(v, str) else (0, "", float(v)),
            )
            rows.append((name, ", ".join(str(v) for v in vals)))
    axes = sorted({k for _, r in df.iterrows() for k in _axes(r)})
    rows.append(("axes", ", ".join(axes) or "none"))
    return Section("cluster", html_table(None, rows, left=2), md_table(None, rows, left=2))


def _memory(ok: pd.DataFrame) -> Section:
    if "memory_per_device_bytes" not in ok or ok["memory_per_device_bytes"].isna().all():
        return missing("memory", "The results hold no memory figures.")
    keys = ["hardware", "model", "mode", "num_devices"]
    g = ok.groupby(keys, sort=True)["memory_per_device_bytes"].max().reset_index()
    g = g.head(MAX_ROWS)
    labels = [f"{r.hardware} ×{r.num_devices} {r.mode}" for r in g.itertuples()]
    hbm = [_hbm_bytes(str(h)) for h in g["hardware"]]
    bds = [{"total_bytes": float(m)} for m in g["memory_per_device_bytes"]]
    svg = memory_svg(labels, bds, hbm)
    header = ("hardware", "model", "mode", "devices", "memory per device", "HBM", "fits")
    rows = [
        (
            r["hardware"],
            r["model"],
            r["mode"],
            int(r["num_devices"]),
            fmt_bytes(float(r["memory_per_device_bytes"])),
            "?" if np.isnan(h) else fmt_bytes(h),
            "?" if np.isnan(h) else ("yes" if float(r["memory_per_device_bytes"]) <= h else "NO"),
        )
        for r, h in zip(g.to_dict("records"), hbm, strict=True)
    ]
    cap = (
        "Bytes one device holds (largest over the cases of that size); black tick: HBM "
        "capacity (named above the bars when far off scale)."
    )
    return Section(
        "memory",
        figure(svg, cap) + html_table(header, rows, left=3),
        md_table(header, rows, left=3),
    )


def _breakdown(ok: pd.DataFrame) -> Section:
    show = ok.head(MAX_ROWS)
    labels = case_labels(show)
    bds = [
        {k: _num(r.get(k)) if not pd.isna(r.get(k)) else 0.0 for _, k in PARTS}
        for _, r in show.iterrows()
    ]
    header = ("case", "step time", "tokens/s", "drop rate", *(n for n, _ in PARTS))
    rows = [
        (
            lab,
            fmt_us(r["step_time_us"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{100 * _drop(r):.3f}%",
            *(fmt_us(b[k]) for _, k in PARTS),
        )
        for lab, (_, r), b in zip(labels, show.iterrows(), bds, strict=True)
    ]
    more = f" (first {MAX_ROWS} of {len(ok)} cases)" if len(ok) > MAX_ROWS else ""
    cap = f"Busy and waiting time of the device that finishes last, per case{more}."
    return Section(
        "breakdown",
        figure(breakdown_rows_svg(labels, bds), cap) + html_table(header, rows),
        md_table(header, rows),
    )


def _stragglers(ok: pd.DataFrame) -> Section:
    if "straggler_penalty" not in ok or ok["straggler_penalty"].isna().all():
        return missing("stragglers", "The results hold no straggler figures.")
    top = ok.sort_values(["straggler_penalty", "case_index"], ascending=[False, True]).head(10)
    header = (
        "case",
        "straggler penalty (worst layer)",
        "routed balance (worst layer)",
        "drop rate",
    )
    rows = [
        (
            lab,
            f"{100 * r['straggler_penalty']:.1f}%",
            f"{_num(r.get('routed_balance')):.3f}",
            f"{100 * _num(r.get('drop_rate')):.3f}%",
        )
        for lab, (_, r) in zip(case_labels(top), top.iterrows(), strict=True)
    ]
    note = (
        "Cases with the largest straggler penalty. A sweep keeps each case's worst layer only; "
        "the per-layer table with the device, cause and expert or link behind each straggler "
        "is in the report of `moesim simulate` on that case."
    )
    return Section(
        "stragglers",
        html_table(header, rows) + f'<p class="muted">{html_lib.escape(note)}</p>',
        md_table(header, rows) + "\n\n" + note,
    )


def _group_labels(df: pd.DataFrame, drop: tuple[str, ...]) -> pd.Series:
    return pd.Series(case_labels(df, drop=drop), index=df.index)


def drops_section(
    drops: pd.DataFrame, group: str, caption: str, group_title: str = "other axes"
) -> Section:
    """Drop rate against capacity factor; ``drops``: capacity_factor, drop_rate, ``group``."""
    d = drops.dropna(subset=["capacity_factor", "drop_rate"])
    if d["capacity_factor"].nunique() < 2:
        return missing("drops", "Fewer than two capacity factors among the cases.")
    grid = d.pivot_table(
        index=group, columns="capacity_factor", values="drop_rate", aggfunc="max"
    ).sort_index()
    # groups whose drop rates agree at every factor (drops depend on routing and capacity,
    # not on hardware, mode or placement) share one line and one row
    same: dict[tuple[float, ...], list[str]] = {}
    for name, vals in zip(grid.index.tolist(), grid.to_numpy().tolist(), strict=True):
        same.setdefault(tuple(round(float(v), 9) for v in vals), []).append(str(name))
    label = {
        n: names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} with equal drops)"
        for names in same.values()
        for n in names
    }
    d = d.assign(**{group: d[group].astype(str).map(label)})
    grid = grid.groupby(grid.index.astype(str).map(label), sort=False).max()
    header = (f"{group_title} \\ capacity factor", *(f"{c:g}" for c in grid.columns))
    rows = [
        (name, *("-" if pd.isna(v) else f"{100 * v:.3f}%" for v in vals))
        for name, vals in zip(grid.index.tolist(), grid.to_numpy().tolist(), strict=True)
    ]
    return Section(
        "drops",
        figure(drop_vs_capacity_svg(d, group), caption) + html_table(header, rows),
        md_table(header, rows),
    )


def _placement(ok: pd.DataFrame) -> Section:
    if "placement" not in ok or ok["placement"].nunique() < 2:
        return missing("placement", "Fewer than two placement strategies among the cases.")
    g = ok.groupby("placement", sort=True)
    header = (
        "placement",
        "cases",
        "mean step time",
        "mean tokens/s",
        "worst drop rate",
        "worst routed balance",
    )
    rows = [
        (
            p,
            len(x),
            fmt_us(x["step_time_us"].mean()),
            f"{x['tokens_per_s'].mean():,.0f}",
            f"{100 * max(_drop(r) for _, r in x.iterrows()):.3f}%",
            f"{x['routed_balance'].max():.3f}" if "routed_balance" in x else "-",
        )
        for p, x in g
    ]
    cap = "Mean step time of the cases with each placement (lower is better)."
    return Section(
        "placement",
        figure(placement_svg(ok), cap) + html_table(header, rows),
        md_table(header, rows),
    )


def scaling_section(ok: pd.DataFrame, caption: str, max_drop_rate: float = 0.0) -> Section:
    """Throughput against devices, with ideal scaling from the smallest cluster; the best
    case at each size among those within the drop budget."""
    ok = within_budget(ok, max_drop_rate)
    if ok["num_devices"].nunique() < 2:
        return missing(
            "scaling", f"Fewer than two cluster sizes among the {_budget_text(max_drop_rate)}."
        )
    d = ok.assign(series=ok["hardware"].astype(str) + " " + ok["mode"].astype(str))
    if "drop_rate" not in d:
        d = d.assign(drop_rate=0.0)
    header = ("series", "devices", "tokens/s", "drop rate", "ideal tokens/s", "efficiency")
    rows = []
    for s, g in d.groupby("series", sort=True):
        best_rows = g.loc[g.groupby("num_devices", sort=True)["tokens_per_s"].idxmax()]
        counts = best_rows["num_devices"].to_numpy(dtype=float)
        tps = best_rows["tokens_per_s"].to_numpy(dtype=float)
        drops = best_rows["drop_rate"].fillna(0.0).to_numpy(dtype=float)
        for n, t, dr in zip(counts, tps, drops, strict=True):
            ideal = tps[0] * n / counts[0]
            rows.append(
                (
                    s,
                    int(n),
                    f"{t:,.0f}",
                    f"{100 * dr:.3f}%",
                    f"{ideal:,.0f}",
                    f"{100 * t / ideal:.0f}%",
                )
            )
    return Section(
        "scaling",
        figure(scaling_svg(d, "series"), caption) + html_table(header, rows),
        md_table(header, rows),
    )


def _links(ok: pd.DataFrame) -> Section:
    if "cross_node_bytes" not in ok or ok["cross_node_bytes"].isna().all():
        return missing("links", "The results hold no traffic figures.")
    top = ok.sort_values(["cross_node_bytes", "case_index"], ascending=[False, True]).head(8)
    header = ("case", "cross-node bytes per step", "dispatch", "combine")
    rows = [
        (
            lab,
            fmt_bytes(_num(r["cross_node_bytes"])),
            fmt_us(_num(r.get("dispatch_us"))),
            fmt_us(_num(r.get("combine_us"))),
        )
        for lab, (_, r) in zip(case_labels(top), top.iterrows(), strict=True)
    ]
    note = (
        "Cases moving the most bytes between nodes. Per-link traffic (the busiest device "
        "pair of each layer) is in the report of `moesim simulate` on one case."
    )
    return Section(
        "links",
        html_table(header, rows) + f'<p class="muted">{html_lib.escape(note)}</p>',
        md_table(header, rows) + "\n\n" + note,
    )


def results_sections(
    df: pd.DataFrame, meta: dict[str, Any] | None = None, max_drop_rate: float | None = None
) -> dict[str, Section]:
    """Every section of a results table's page, keyed by section key. The best answers and
    the scaling table keep to cases within the drop budget: ``max_drop_rate``, else the
    sweep's (``meta["max_drop_rate"]``), else 0 (dropless)."""
    if max_drop_rate is None:
        max_drop_rate = float((meta or {}).get("max_drop_rate") or 0.0)
    if df["mode"].nunique() > 1:  # one scenario's modes are separate cases with equal axes
        df = df.assign(
            axes=[
                json.dumps(_axes(r) | {"mode": r["mode"]}, sort_keys=True) for _, r in df.iterrows()
            ]
        )
    ok = df[df["status"] == "ok"]
    failed = df[df["status"] != "ok"]
    drops = ok.assign(group=_group_labels(ok, _CF_KEYS)) if not ok.empty else ok
    sections = [
        _answer(ok, failed, meta or {}, max_drop_rate),
        _cluster(df),
        missing("heatmap", "A sweep keeps no per-device loads; simulate one case to see them."),
        missing("timeline", "A sweep keeps no timelines; simulate one case to see its timeline."),
    ]
    if not ok.empty:
        sections += [
            _memory(ok),
            _breakdown(ok),
            _stragglers(ok),
            drops_section(
                drops,
                "group",
                "Dropped assignments against capacity factor; one line per combination of the "
                "other axes.",
            ),
            _placement(ok),
            scaling_section(
                ok,
                "Simulated throughput (solid) and ideal linear scaling from the smallest "
                "cluster (dashed), per hardware and mode; best case at each size among the "
                f"{_budget_text(max_drop_rate)}.",
                max_drop_rate,
            ),
            _links(ok),
        ]
    else:
        why = "No case finished."
        sections += [
            missing(k, why)
            for k in ("memory", "breakdown", "stragglers", "drops", "placement", "scaling", "links")
        ]
    return {s.key: s for s in sections}


def write_sweep_report(
    results_dir: str | Path, out_dir: str | Path, *, force: bool = False
) -> dict[str, Path]:
    """report.html and summary.md of a sweep results folder, written to ``out_dir`` (the
    results folder itself, or a folder of their own, written whole)."""
    folder = Path(results_dir)
    df, meta = read_results(folder)
    sections = list(results_sections(df, meta).values())
    title = f"moesim sweep report: {folder.resolve().name}"
    subtitle = f"{len(df)} cases from {folder.name}/results.parquet" + (
        f" (sweep {str(meta['sweep_id'])[:16]})" if meta.get("sweep_id") else ""
    )
    source = f"{folder.name}/results.parquet"
    html = render_page(title, subtitle, sections, source)
    md = render_markdown(title, subtitle, sections, source)
    payload = {"report.html": html.encode(), "summary.md": md.encode()}
    return write_output_folder(out_dir, "report", payload, force=force)
