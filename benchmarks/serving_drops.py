"""Drops and step time of a DeepSeek-V3 serving plan on 4 x 8 H200, with and without
replicas, at several capacity factors and dropless.

    python benchmarks/serving_drops.py [--json] [--tokens-per-device 512] [--quick]

DeepSeek-V3 (256 routed experts, top-8, 58 MoE layers) prefills 512 tokens per GPU on
4 nodes x 8 H200 (FP8), routing drawn per token from a Zipf-1.0 law (seed 3: a skewed
workload). Placements: ``contiguous`` (8 experts per GPU) and ``eplb-global`` with 32
redundant slots (9 slots per GPU), planned from the routing's own loads. Capacity is per
physical slot (``ceil(factor * assignments / slots)``), so the replicas add capacity: the
drop rate of the planned placement falls faster with the factor than the contiguous one.
Each case prints the drop rate, the step time, the throughput of processed tokens, and the
smallest capacity factor that drops nothing (largest slot load over the mean, worst
layer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FACTORS: tuple[float | None, ...] = (1.0, 1.25, 2.0, 4.0, None)
PLACEMENTS = (("contiguous", 0), ("eplb-global", 32))


def scenario(placement: str, redundant: int, factor: float | None, tokens: int) -> Any:
    """The serving scenario of one case, validated."""
    sys.path.insert(0, str(REPO))
    from moesim.scenario import Scenario

    return Scenario.model_validate(
        {
            "name": f"deepseek-v3-h200-{placement}-{redundant}",
            "hardware": "H200",
            "cluster": {"nodes": 4, "devices_per_node": 8},
            "model": "DeepSeek-V3",
            "routing": {"synthetic": {"distribution": "zipf:1.0", "seed": 3}},
            "placement": placement,
            "redundant_slots": redundant,
            "capacity": {"factor": factor},
            "mode": "prefill",
            "tokens_per_device": tokens,
            "sequence_length": 4096,
            "precision": "fp8",
            "dispatcher": {"preset": "deepep-normal", "dedup": "none"},
        }
    )


def run_case(placement: str, redundant: int, factor: float | None, tokens: int) -> dict:
    """One case simulated: its drop rate, step time, throughput and dropless factor."""
    from moesim.sim.simulate import simulate

    t0 = time.perf_counter()
    res = simulate(scenario(placement, redundant, factor, tokens), REPO).runs[0]
    s = res.summary
    return {
        "placement": placement,
        "redundant_slots": redundant,
        "capacity_factor": factor,
        "drop_rate": s["drop_rate"],
        "step_time_us": s["step_time_us"],
        "tokens_per_s": s["tokens_per_s"],
        "dropless_capacity_factor": float(res.layers["dropless_capacity_factor"].max()),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the cases as JSON")
    ap.add_argument("--tokens-per-device", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="factors 1.25 and dropless only")
    args = ap.parse_args()
    factors = (1.25, None) if args.quick else FACTORS
    cases = [run_case(p, r, f, args.tokens_per_device) for p, r in PLACEMENTS for f in factors]
    if args.json:
        print(json.dumps({"cases": cases}, indent=2))
        return
    print(f"DeepSeek-V3 prefill, 4 x 8 H200, {args.tokens_per_device} tokens/GPU, Zipf 1.0 routing")
    print(
        f"{'placement':<16}{'factor':>8}{'drop rate':>11}{'step time':>12}"
        f"{'tokens/s':>14}{'dropless at':>13}"
    )
    for c in cases:
        f = "none" if c["capacity_factor"] is None else f"{c['capacity_factor']:g}"
        name = f"{c['placement']}+{c['redundant_slots']}"
        print(
            f"{name:<16}{f:>8}{100 * c['drop_rate']:>10.1f}%{c['step_time_us'] / 1e3:>9.1f} ms"
            f"{c['tokens_per_s']:>14,.0f}{c['dropless_capacity_factor']:>13.2f}"
        )


if __name__ == "__main__":
    main()
