"""Cost-model error on shapes held out of the calibration.

    python benchmarks/cost_model_error.py [--device-dir kernels/measured/<device>] [--json]
        [--worst N]

Two protocols, errors as |predicted / measured - 1|:

* held-out shapes (the headline figures): every model shape in the table is removed from
  the whole table (every op, so neither its own rows nor its memory copies inform the
  fit), the cost model is calibrated on the other shapes, and the held-out shape is
  predicted at every measured token count of every (op, dtype);
* held-out points: a seeded random quarter of the table's measurements is removed and
  predicted by the cost model as the simulator uses it (monotone interpolation where
  the shape still has measurements around the point, calibrated roofline elsewhere) —
  a device measured only partly.

Both protocols use the table as measured: no point is dropped or re-weighted. The
slope ridge of the token correction (``moesim.costs.model.SLOPE_RIDGE``) was chosen
among 1, 10 and 1000 by the held-out-shape median of this benchmark, so that figure is
slightly optimistic for an unseen table. The shared memory curve
(``moesim.costs.model.fit_memory_curve``) was adopted after seeing, on a partial
one-thread measurement run (five shapes, not committed), per-op fits extrapolate a
held-out shape at a memory bandwidth of 0.14 GB/s (errors up to 50x); on the committed
tables first measured under load it left the median as it was (20.6 -> 20.5 %) and lowered
the max (731 -> 301 %).
A per-op cache-step position was tried on the committed tables and not kept (20.4 %).

``repeat floor``: rows of two model shapes whose op, dtype, widths and tokens are equal
are one call measured twice; their spread bounds what any model can reach.
``sitting floor``: points of the table measured again in a later run and saved under
``<device-dir>/resits/NAME`` (``benchmarks/kernel_resit.py``); their spread is the
same kind of bound, across whole runs.

Targets (issue 19, re-ruled), checked for each protocol and printed PASS / FAIL:
median <= 10 %, p95 <= 25 %, and max <= 25 % over the held-out points whose two sittings
agree, i.e. points measured again in a saved resit with ``|resit / table - 1| <= 10 %``
(with several resits, every one of them; a point no resit measured is not counted).

The figures depend on the tables alone (this script measures nothing): it prints the
machine that measured them (the folder's ``meta.json``, else the rows' ``device``) beside
the machine this run is on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_resit  # noqa: E402  (benchmarks/kernel_resit.py)

from moesim.costs.model import CostModel  # noqa: E402
from moesim.costs.work import BenchShape  # noqa: E402
from moesim.kernels.bench import device_name  # noqa: E402
from moesim.kernels.tables import load_table  # noqa: E402
from moesim.model.shapes import get_preset  # noqa: E402


def _shape(op: str, model: str, num_experts: int) -> BenchShape:
    """The benchmark shape of a table row (FFN rows: their local experts)."""
    shape = BenchShape.from_model(get_preset(model), num_experts)
    if not op.startswith("expert_ffn"):
        shape = BenchShape.from_model(get_preset(model), shape.local_experts)
    return shape


def _row(op: str, dtype: str, model: str, tokens: int, measured: float, pred: float) -> dict:
    return {
        "op": op,
        "dtype": dtype,
        "model": model,
        "tokens": tokens,
        "measured_us": measured,
        "predicted_us": pred,
        "err": abs(pred / measured - 1),
    }


def held_out_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Hold each model shape out of the *whole* table (every op), calibrate on the rest,
    and predict the held-out shape's rows of every (op, dtype) measured on another shape."""
    rows = []
    for held in sorted(table["model"].unique()):
        train = table[table["model"] != held]
        cm = CostModel.from_table(train)
        seen = set(zip(train["op"], train["dtype"], strict=True))
        test = table[table["model"] == held]
        for (op, dtype), part in test.groupby(["op", "dtype"], sort=True):
            if (op, dtype) not in seen:
                continue
            part = part.sort_values("tokens")
            shape = _shape(str(op), str(held), int(part["num_experts"].iloc[0]))
            pred = cm.roofline_us(str(op), shape, part["tokens"].to_numpy(float), str(dtype))
            for t, p, m in zip(part["tokens"], pred, part["median_us"], strict=True):
                rows.append(_row(str(op), str(dtype), str(held), int(t), float(m), float(p)))
    return pd.DataFrame(rows)


def held_out_point_errors(table: pd.DataFrame, share: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """Remove a seeded random ``share`` of the rows, calibrate on the rest, predict them."""
    rng = np.random.default_rng(seed)
    held = rng.random(len(table)) < share
    cm = CostModel.from_table(table[~held])
    rows = []
    for r in table[held].itertuples():
        shape = _shape(str(r.op), str(r.model), int(r.num_experts))
        p = float(cm.time_us(str(r.op), shape, np.array([float(r.tokens)]), str(r.dtype))[0])
        rows.append(
            _row(str(r.op), str(r.dtype), str(r.model), int(r.tokens), float(r.median_us), p)
        )
    return pd.DataFrame(rows)


WIDTHS = ("d_model", "d_ff", "num_experts", "top_k", "num_heads", "num_kv_heads", "head_dim")


def repeat_errors(table: pd.DataFrame) -> pd.DataFrame:
    """The measurement's own spread: rows of different model shapes whose op, dtype, widths
    and tokens are the same (e.g. memcpy of OLMoE-1B-7B and DeepSeekMoE-16B, both
    d_model 2048) are the same call measured at different times. Any model predicts them
    alike, so ``|a / b - 1|`` over both orders is a floor under the held-out-shape error."""
    key = ["op", "dtype", *[c for c in WIDTHS if c in table.columns], "tokens"]
    rows = []
    for _, g in table.groupby(key, sort=True):
        if g["model"].nunique() < 2:
            continue
        t = g["median_us"].to_numpy(float)
        ratio = t[:, None] / t[None, :]
        off = ~np.eye(len(t), dtype=bool)
        for r in ratio[off]:
            rows.append({"op": g["op"].iloc[0], "dtype": g["dtype"].iloc[0], "err": abs(r - 1)})
    return pd.DataFrame(rows, columns=["op", "dtype", "err"])


AGREE_WITHIN = 0.10
"""Two sittings of a point agree when ``|resit / table - 1|`` is at most this."""

TARGETS = {"median_err": 0.10, "p95_err": 0.25, "agreeing_max_err": 0.25}
"""Issue 19's targets, each an upper bound on the figure of that name."""

_TARGET_NAMES = {"median_err": "median", "p95_err": "p95", "agreeing_max_err": "agreeing max"}


def sitting_agreement(errs: pd.DataFrame, pairs: pd.DataFrame | None) -> tuple[np.ndarray, ...]:
    """Per row of ``errs`` (keyed by ``kernel_resit.KEY``): whether ``pairs``
    (``kernel_resit.compare`` rows, one per resit and point) measured it again, and whether
    its sittings agree (every resit within :data:`AGREE_WITHIN` of the table)."""
    if pairs is None or pairs.empty:
        none = np.zeros(len(errs), dtype=bool)
        return none, none
    key = pd.MultiIndex.from_frame(errs[kernel_resit.KEY])
    worst = pairs.groupby(kernel_resit.KEY)["err"].max()
    resat = key.isin(worst.index)
    return resat, resat & (worst.reindex(key).to_numpy(float) <= AGREE_WITHIN)


def agreeing_figures(errs: pd.DataFrame, pairs: pd.DataFrame | None) -> dict:
    """The max of ``errs["err"]`` over the points whose sittings agree
    (:func:`sitting_agreement`; ``None`` where none does), their count, and how many
    points were measured again at all."""
    resat, agree = sitting_agreement(errs, pairs)
    err = errs["err"].to_numpy(float)
    return {
        "agreeing_max_err": round(float(err[agree].max()), 4) if agree.any() else None,
        "agreeing_points": int(agree.sum()),
        "resat_points": int(resat.sum()),
    }


def target_checks(fig: dict) -> dict[str, bool]:
    """Whether each of :data:`TARGETS` holds for a protocol's figures (a figure that could
    not be computed does not hold)."""
    return {k: fig.get(k) is not None and fig[k] <= limit for k, limit in TARGETS.items()}


def protocol_figures(errs: pd.DataFrame, pairs: pd.DataFrame | None) -> dict:
    """A protocol's error figures (:func:`kernel_resit.summary`, the sitting-agreeing max
    and count) and its target checks."""
    fig = kernel_resit.summary(errs) | agreeing_figures(errs, pairs)
    return fig | {"checks": target_checks(fig)}


def table_machine(device_dir: Path, table: pd.DataFrame) -> dict:
    """Which machine measured a table: its folder's ``meta.json`` (``cpu`` for a CPU
    table, else ``device``; ``created``, ``cpu_count``), else the rows' ``device``
    column (``source`` says which)."""
    path = device_dir / "meta.json"
    if path.is_file():
        meta = json.loads(path.read_text())
        name = meta.get("cpu") if meta.get("device_kind") == "cpu" else meta.get("device")
        if name:
            return {
                "name": str(name),
                "created": meta.get("created"),
                "cpu_count": meta.get("cpu_count"),
                "source": "meta.json",
            }
    names = sorted({str(d) for d in table["device"]})
    return {"name": ", ".join(names), "created": None, "cpu_count": None, "source": "rows"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _agree_text(f: dict) -> str:
    m = f["agreeing_max_err"]
    return (
        f"max over the {f['agreeing_points']} points whose two sittings agree within "
        f"{AGREE_WITHIN:.0%} (of {f['resat_points']} measured again): "
        f"{_pct(m)}"
    )


def _stats_text(f: dict) -> str:
    return (
        f"median {f['median_err']:.1%}, p90 {f['p90_err']:.1%}, p95 {f['p95_err']:.1%}, "
        f"max {f['max_err']:.1%}"
    )


def _worst(errs: pd.DataFrame) -> dict:
    """The row of ``errs`` with the largest error, as plain JSON values."""
    w = errs.loc[errs["err"].idxmax()]
    return {k: (v if isinstance(v, str) else float(v)) for k, v in w.items()}


def _print_worst(label: str, w: dict) -> None:
    print(
        f"  {label}: {w['op']} {w['dtype']} {w['model']} at {int(w['tokens'])} tokens: "
        f"predicted {w['predicted_us']:.1f} us, measured {w['measured_us']:.1f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device-dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--worst", type=int, default=0, help="also print the N worst held-out-shape points"
    )
    args = ap.parse_args()
    device_dir = kernel_resit.table_dir(args.device_dir)
    table = load_table(device_dir)
    errs = held_out_errors(table)
    if errs.empty:
        sys.exit(f"{device_dir}: no op has two or more shapes to hold out")
    resits = {d.name: load_table(d) for d in kernel_resit.resit_dirs(device_dir)}
    pairs = (
        pd.concat([kernel_resit.compare(table, again) for again in resits.values()])
        if resits
        else None
    )
    fig = {
        "device_dir": str(
            device_dir.relative_to(REPO) if device_dir.is_relative_to(REPO) else device_dir
        ),
        "tables_measured_on": table_machine(device_dir, table),
        "this_run_on": device_name("cpu"),
        "threads": sorted(int(x) for x in table["threads"].unique()),
        **protocol_figures(errs, pairs),
        "shapes": int(errs.groupby(["op", "dtype", "model"]).ngroups),
        "worst": _worst(errs),
        "targets": TARGETS | {"agree_within": AGREE_WITHIN},
    }
    agree = sitting_agreement(errs, pairs)[1]
    if agree.any():
        fig["worst_agreeing"] = _worst(errs[agree])
    pts = held_out_point_errors(table)
    hp = protocol_figures(pts, pairs)
    fig["held_out_points"] = {k: v for k, v in hp.items() if k != "per_op"}
    rep = repeat_errors(table)
    if len(rep):
        fig["repeat_floor"] = {
            "median_err": round(float(rep["err"].median()), 4),
            "max_err": round(float(rep["err"].max()), 4),
            "pairs": len(rep),
            "ops": sorted(set(rep["op"])),
        }
    if pairs is not None:
        fig["sitting_floor"] = {
            k: v for k, v in kernel_resit.summary(pairs).items() if k != "per_op"
        } | {"resits": sorted(resits)}
    if args.json:
        print(json.dumps(fig, indent=2))
        return
    m = fig["tables_measured_on"]
    bits = (m["cpu_count"] and f"{m['cpu_count']} CPUs", str(m["created"] or "")[:10])
    when = ", ".join([*(b for b in bits if b), f"from {m['source']}"])
    print(
        f"{fig['device_dir']}: tables measured on {m['name']} ({when}); this run on "
        f"{fig['this_run_on']} (it measures nothing: the figures depend on the tables only)"
    )
    print(
        f"held-out shapes ({fig['points']} points of {fig['shapes']} shapes): "
        f"{_stats_text(fig)}; {_agree_text(fig)}"
    )
    kernel_resit.print_per_op(fig)
    hp = fig["held_out_points"]
    print(
        f"held-out points ({hp['points']}, a random quarter, predicted as the simulator does): "
        f"{_stats_text(hp)}; {_agree_text(hp)}"
    )
    if "repeat_floor" in fig:
        rf = fig["repeat_floor"]
        print(
            f"repeat floor ({rf['pairs']} ordered pairs of equal calls measured for two shapes: "
            f"{', '.join(rf['ops'])}): median {rf['median_err']:.1%}, max {rf['max_err']:.1%}"
        )
    if "sitting_floor" in fig:
        sf = fig["sitting_floor"]
        print(
            f"sitting floor ({sf['points']} points measured again in a later run, resits "
            f"{', '.join(sf['resits'])}): {_stats_text(sf)}"
        )
    _print_worst("worst", fig["worst"])
    if "worst_agreeing" in fig:
        _print_worst("worst whose sittings agree", fig["worst_agreeing"])
    print(
        "targets: "
        + ", ".join(f"{_TARGET_NAMES[k]} <= {v:.0%}" for k, v in TARGETS.items())
        + f" (agreeing: sittings within {AGREE_WITHIN:.0%})"
    )
    for name, f in (("held-out shapes", fig), ("held-out points", hp)):
        cells = [
            f"{_TARGET_NAMES[k]} {_pct(f[k])} {'PASS' if ok else 'FAIL'}"
            for k, ok in f["checks"].items()
        ]
        print(f"  {name}: {', '.join(cells)}")
    if args.worst > 0:
        print(f"{args.worst} worst held-out-shape points:")
        cols = ["op", "dtype", "model", "tokens", "measured_us", "predicted_us", "err"]
        print(errs.nlargest(args.worst, "err")[cols].to_string(index=False, float_format="%.3g"))


if __name__ == "__main__":
    main()
