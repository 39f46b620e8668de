"""Cost-model error on shapes held out of the calibration.

    python benchmarks/cost_model_error.py [--device-dir kernels/measured/<device>] [--json]

For every (op, dtype) of a measured table and every shape (model preset) in it, the
roofline factors are calibrated on the *other* shapes only, and the held-out shape's
times are predicted for every measured token count. Errors are |predicted / measured - 1|.
Targets on this CPU's tables (issue 4): median <= 10 %, max <= 25 %.
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

from moesim.costs.model import CostModel  # noqa: E402
from moesim.kernels.bench import BenchShape  # noqa: E402
from moesim.kernels.tables import load_table  # noqa: E402
from moesim.model.shapes import get_preset  # noqa: E402


def default_device_dir() -> Path:
    from moesim.kernels.bench import device_name
    from moesim.kernels.tables import device_slug

    return REPO / "kernels" / "measured" / device_slug(device_name("cpu"))


def held_out_errors(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (op, dtype), group in table.groupby(["op", "dtype"], sort=True):
        models = sorted(group["model"].unique())
        if len(models) < 2:
            continue
        for held in models:
            train = group[group["model"] != held]
            test = group[group["model"] == held].sort_values("tokens")
            cm = CostModel.from_table(train)
            first = test.iloc[0]
            shape = BenchShape.from_model(get_preset(held), int(first["num_experts"]))
            if not op.startswith("expert_ffn"):
                shape = BenchShape.from_model(get_preset(held), shape.local_experts)
            pred = cm.roofline_us(str(op), shape, test["tokens"].to_numpy(float), str(dtype))
            meas = test["median_us"].to_numpy(float)
            for t, p, m in zip(test["tokens"], pred, meas, strict=True):
                rows.append(
                    {
                        "op": op,
                        "dtype": dtype,
                        "model": held,
                        "tokens": int(t),
                        "measured_us": m,
                        "predicted_us": float(p),
                        "err": abs(float(p) / m - 1),
                    }
                )
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device-dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device_dir = args.device_dir or default_device_dir()
    table = load_table(device_dir)
    errs = held_out_errors(table)
    if errs.empty:
        sys.exit(f"{device_dir}: no op has two or more shapes to hold out")
    per_op = errs.groupby(["op", "dtype"])["err"].agg(["median", "max", "count"]).reset_index()
    worst = errs.loc[errs["err"].idxmax()]
    fig = {
        "device_dir": str(
            device_dir.relative_to(REPO) if device_dir.is_relative_to(REPO) else device_dir
        ),
        "median_err": round(float(errs["err"].median()), 4),
        "p90_err": round(float(np.quantile(errs["err"], 0.9)), 4),
        "max_err": round(float(errs["err"].max()), 4),
        "shapes": int(errs.groupby(["op", "dtype", "model"]).ngroups),
        "points": len(errs),
        "worst": {k: (v if isinstance(v, str) else float(v)) for k, v in worst.items()},
        "per_op": [
            {
                "op": r.op,
                "dtype": r.dtype,
                "median_err": round(r.median, 4),
                "max_err": round(r.max, 4),
                "points": int(r.count),
            }
            for r in per_op.itertuples()
        ],
        "targets": {"median_err": 0.10, "max_err": 0.25},
    }
    if args.json:
        print(json.dumps(fig, indent=2))
        return
    print(
        f"{fig['device_dir']}: held-out error over {fig['points']} points of {fig['shapes']} "
        f"shapes: median {fig['median_err']:.1%}, p90 {fig['p90_err']:.1%}, "
        f"max {fig['max_err']:.1%} (targets: median <= 10%, max <= 25%)"
    )
    for r in fig["per_op"]:
        print(
            f"  {r['op']:20s} {r['dtype']:5s} median {r['median_err']:6.1%}  max "
            f"{r['max_err']:6.1%}  ({r['points']} points)"
        )
    w = fig["worst"]
    print(
        f"  worst: {w['op']} {w['dtype']} {w['model']} at {int(w['tokens'])} tokens: "
        f"predicted {w['predicted_us']:.1f} us, measured {w['measured_us']:.1f} us"
    )


if __name__ == "__main__":
    main()
