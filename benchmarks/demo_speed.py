"""How long the demo takes, end to end and by stage.

    python benchmarks/demo_speed.py [--json] [--repeats N]

Prints the wall time of ``moesim demo`` run as a user runs it (a fresh Python process:
imports, simulation of both modes, report rendering, file writes), and the in-process
time of each stage. The target is under 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print figures as JSON")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "moesim", "demo", "--out", tmp],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            walls.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                sys.exit(f"demo failed: {proc.stderr}")

        from moesim.paths import scenarios_dir
        from moesim.report import write_outputs
        from moesim.scenario import load_scenario
        from moesim.sim.prepare import prepare
        from moesim.sim.simulate import simulate_mode

        stages = {}
        t = time.perf_counter()
        sc, base = load_scenario(scenarios_dir() / "demo.yaml")
        prep = prepare(sc, base)
        stages["load_s"] = time.perf_counter() - t
        for mode in sc.modes:
            t = time.perf_counter()
            simulate_mode(prep, mode)
            stages[f"simulate_{mode}_s"] = time.perf_counter() - t
        from moesim.sim.simulate import simulate

        result = simulate(sc, base)
        t = time.perf_counter()
        write_outputs(result, Path(tmp) / "again")
        stages["write_outputs_s"] = time.perf_counter() - t

    figures = {
        "demo_wall_s_median": statistics.median(walls),
        "demo_wall_s": walls,
        "target_s": 60.0,
        **{k: round(v, 4) for k, v in stages.items()},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"moesim demo, fresh process: median {figures['demo_wall_s_median']:.2f} s over "
            f"{len(walls)} runs (target < 60 s)"
        )
        for k, v in stages.items():
            print(f"  {k:24s} {v:8.3f} s")


if __name__ == "__main__":
    main()
