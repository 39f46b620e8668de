"""How long ``moesim plan-capacity`` takes, and what it answers, for the issue's four cases.

    python benchmarks/plan_capacity.py [--json] [--models DeepSeek-V3 Mixtral-8x7B]

Runs ``moesim plan-capacity --json`` as a user runs it (a fresh Python process) for each
model on H100-SXM and B200 at 200,000 tokens/s within 50 ms per step, and prints its wall
time and the answers. The target is a few minutes per model on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 180.0
ARGS = ("--hardware", "H100-SXM", "B200", "--tokens-per-s", "200000", "--latency-slo-ms", "50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print figures as JSON")
    ap.add_argument("--models", nargs="+", default=["DeepSeek-V3", "Mixtral-8x7B"])
    args = ap.parse_args()

    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "moesim", "plan-capacity", "--model", model, *ARGS,
                 "--out", str(Path(tmp) / model), "--json"],
                capture_output=True, text=True, cwd=REPO,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            figures[model] = {"wall_s": round(wall, 1), "answers": json.loads(proc.stdout)}
    out = {"target_s": TARGET_S, "models": figures}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for model, f in figures.items():
        print(f"{model}: {f['wall_s']:.1f} s (target {TARGET_S:.0f} s)")
        for hw, a in f["answers"].items():
            print(
                f"  {hw:9s} memory {a['min_devices_memory']}, throughput "
                f"{a['min_devices_throughput']}, latency {a['min_devices_slo']} devices; "
                f"capacity factor {a['recommended_capacity_factor'] or 'dropless'}, "
                f"{a['tokens_per_s'] or 0:,.0f} tokens/s at {100 * (a['drop_rate'] or 0):.3f}% "
                f"dropped"
            )


if __name__ == "__main__":
    main()
