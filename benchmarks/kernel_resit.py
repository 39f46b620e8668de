"""Sitting floor: points of a committed kernel table measured again in a new sitting.

    python benchmarks/kernel_resit.py [--device-dir kernels/measured/<device>]
        [--ops OP ...] [--models M ...] [--dtypes D ...] [--tokens T ...]
        [--save NAME] [--json]
    python benchmarks/kernel_resit.py --compare NAME [--json]

The table's points of the chosen ops, models, dtypes and token counts (default: every
op, every model, both dtypes, tokens 1, 16, 256 and 4,096) are measured again by
``moesim kernels bench`` in this process, with the table's own method (5 rounds, the
same timing budget, the table's thread count), and each new median is compared with the
committed one: ``|new / table - 1|``. The table's five rounds already spread each point
over about 45 minutes; what they cannot see is what a whole run shares (the process's
heap and its placement of the weights, the machine's state that day). This is that
floor: no cost model can be held to less error than the table agrees with itself.

``--save NAME`` writes the new measurement to ``<device-dir>/resits/NAME/`` (``<op>.csv``
and ``meta.json``, the table format; ``load_table`` of the device folder does not read
sub-folders), and
``--compare NAME`` compares a saved one without measuring. ``cost_model_error.py``
reports the saved resits of its device folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim.errors import InputError  # noqa: E402
from moesim.kernels.bench import (  # noqa: E402
    OPS,
    BenchResult,
    default_config,
    measured_dir,
    run_bench,
)
from moesim.kernels.tables import (  # noqa: E402
    load_table,
    thread_count,
    write_meta,
    write_op_table,
)

DEFAULT_TOKENS = (1, 16, 256, 4096)
KEY = ["op", "model", "dtype", "tokens"]


def table_dir(given: Path | None) -> Path:
    """``given``, or this machine's folder under ``kernels/measured``; where this machine
    has no tables yet, a one-line message naming the folders that do, and exit 2."""
    if given is not None:
        return given
    folder = measured_dir()
    if not folder.is_dir():
        have = sorted(p.name for p in folder.parent.iterdir() if any(p.glob("*.csv")))
        print(
            f"{folder}: no kernel tables measured on this machine (measured: "
            f"{', '.join(have) or 'none'}); pass --device-dir or run "
            "`moesim kernels bench --threads 1`",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return folder


def resit_dirs(device_dir: Path) -> list[Path]:
    """The saved resits of a device folder, oldest name first."""
    root = device_dir / "resits"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def compare(table: pd.DataFrame, again: pd.DataFrame) -> pd.DataFrame:
    """Per point measured in both: the two medians and ``err = |again / table - 1|``."""
    a = table.groupby(KEY, as_index=False)["median_us"].median()
    b = again.groupby(KEY, as_index=False)["median_us"].median()
    m = a.merge(b, on=KEY, suffixes=("_table", "_again"))
    m["err"] = (m["median_us_again"] / m["median_us_table"] - 1).abs()
    return m


def summary(pairs: pd.DataFrame) -> dict:
    """Median, p90, p95 and max of ``err`` (p90 and p95: numpy's linear quantile), overall,
    median and max per (op, dtype), and the point count."""
    per = pairs.groupby(["op", "dtype"])["err"].agg(["median", "max", "count"]).reset_index()
    return {
        "points": len(pairs),
        "median_err": round(float(pairs["err"].median()), 4),
        "p90_err": round(float(np.quantile(pairs["err"], 0.9)), 4),
        "p95_err": round(float(np.quantile(pairs["err"], 0.95)), 4),
        "max_err": round(float(pairs["err"].max()), 4),
        "per_op": [
            {
                "op": r.op,
                "dtype": r.dtype,
                "median_err": round(r.median, 4),
                "max_err": round(r.max, 4),
                "points": int(r.count),
            }
            for r in per.itertuples()
        ],
    }


def print_per_op(fig: dict) -> None:
    """One line per (op, dtype) of a :func:`summary`."""
    for r in fig["per_op"]:
        print(
            f"  {r['op']:20s} {r['dtype']:5s} median {r['median_err']:6.1%}  max "
            f"{r['max_err']:6.1%}  ({r['points']} points)"
        )


def measure(
    device: Path,
    table: pd.DataFrame,
    ops: list[str],
    models: list[str],
    dtypes: list[str],
    tokens: list[int],
) -> BenchResult:
    """Measure the table's points of the selection again, with the table's method
    (``device``: the table's folder, for the error message). A table mixing thread counts
    is a one-line error, exit 2."""
    try:
        threads = thread_count(table, file=device)
    except InputError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from None
    cfg = default_config("cpu", models=models, threads=threads)
    measured = set(table["tokens"].astype(int))
    cfg = dataclasses.replace(
        cfg,
        ops=tuple(ops),
        dtypes=tuple(dtypes),
        tokens=tuple(sorted(t for t in tokens if t in measured)),
    )
    return run_bench(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device-dir", type=Path, default=None)
    ap.add_argument("--ops", nargs="+", default=list(OPS))
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    ap.add_argument("--save", default=None, help="save the new measurement as resits/NAME")
    ap.add_argument("--compare", default=None, help="compare the saved resits/NAME")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device_dir = table_dir(args.device_dir)
    table = load_table(device_dir)
    if args.compare:
        again = load_table(device_dir / "resits" / args.compare)
    else:
        models = args.models or sorted(table["model"].unique())
        result = measure(device_dir, table, args.ops, models, args.dtypes, args.tokens)
        again = result.rows
        if args.save:
            folder = device_dir / "resits" / args.save
            for op, part in again.groupby("op", sort=True):
                write_op_table(folder, str(op), part)
            write_meta(folder, result.meta)
    pairs = compare(table, again)
    if pairs.empty:
        sys.exit("no point of the selection is in the table")
    fig = summary(pairs)
    if args.json:
        print(json.dumps(fig, indent=2))
        return
    print(
        f"{fig['points']} points measured again: |again / table - 1| median "
        f"{fig['median_err']:.1%}, p90 {fig['p90_err']:.1%}, p95 {fig['p95_err']:.1%}, "
        f"max {fig['max_err']:.1%}"
    )
    print_per_op(fig)
    cols = [*KEY, "median_us_table", "median_us_again", "err"]
    print("worst points:")
    print(pairs.nlargest(8, "err")[cols].to_string(index=False, float_format="%.3g"))


if __name__ == "__main__":
    main()
