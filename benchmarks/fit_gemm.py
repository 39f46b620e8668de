"""The GPU profiles' GEMM efficiency, fitted to the public tables it comes from.

    python benchmarks/fit_gemm.py [--json]

Fits ``efficiency.gemm`` and ``efficiency.gemm_half_outputs`` of the H100-SXM profile to
the BF16 GEMM table ``vllm-23280`` (``hardware_profiles/tables/``; DeepSeek-V3's
N=2112, K=7168 projection, M = 1..8192, H100 SXM) by least squares on log time
(:func:`moesim.costs.fit.fit_gemm`), prints the fit's signed errors, and the error of the
rounded figures the H100-SXM, H800 and H200 profiles carry on the table held out of the
fit (``vllm-49363``: N=12288, K=5376, M = 1..128).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim.costs.fit import fit_gemm, gemm_table  # noqa: E402
from moesim.costs.roofline import gemm_time_us  # noqa: E402
from moesim.hardware import get_profile  # noqa: E402

FIT_TABLE, HELD_OUT = "vllm-23280", "vllm-49363"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    table = gemm_table()
    hw = get_profile("H100-SXM")
    fit_rows = table[table["table"] == FIT_TABLE]
    fit = fit_gemm(fit_rows["m"], fit_rows["n"], fit_rows["k"], fit_rows["time_us"], hw, "bf16")
    out = {
        "fit_table": FIT_TABLE,
        "efficiency": round(fit.efficiency, 4),
        "half_outputs": round(fit.half_outputs),
        "fit_errors": [round(float(e), 4) for e in fit.errors],
        "profile": {
            "gemm": hw.efficiency.gemm,
            "gemm_half_outputs": hw.efficiency.gemm_half_outputs,
        },
        "held_out": [],
    }
    for row in table[table["table"] != FIT_TABLE].itertuples():
        pred = float(gemm_time_us(float(row.m), float(row.n), float(row.k), hw, "bf16"))
        out["held_out"].append(
            {
                "table": row.table,
                "m": int(row.m),
                "n": int(row.n),
                "k": int(row.k),
                "measured_us": round(row.time_us, 3),
                "predicted_us": round(pred, 3),
                "error": round(pred / row.time_us - 1, 4),
            }
        )
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"fit to {FIT_TABLE} (H100 SXM, bf16, N=2112 K=7168): efficiency {fit.efficiency:.4f}, "
        f"half outputs {fit.half_outputs:,.0f}; signed errors "
        + " ".join(f"{100 * e:+.1f}%" for e in fit.errors)
    )
    print(
        f"profile H100-SXM carries gemm {hw.efficiency.gemm}, gemm_half_outputs "
        f"{hw.efficiency.gemm_half_outputs:,.0f}"
    )
    errs = np.array([r["error"] for r in out["held_out"]])
    for r in out["held_out"]:
        print(
            f"  held out {r['table']} M={r['m']} N={r['n']} K={r['k']}: predicted "
            f"{r['predicted_us']:.1f} us, measured {r['measured_us']:.1f} us "
            f"({100 * r['error']:+.1f}%)"
        )
    med, top = 100 * np.median(np.abs(errs)), 100 * np.abs(errs).max()
    print(f"held-out median |error| {med:.1f}%, max {top:.1f}%")


if __name__ == "__main__":
    main()
