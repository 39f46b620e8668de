"""The work per sweep case: how cheap one case of a capacity-planning sweep is.

    python benchmarks/sweep_speed.py [--json] [--cpu] [--repeats N] [--sequences N]

Twenty cases: Mixtral-8x7B on 8 x H100-SXM and 8 x H200 (one node, EP8), prefill and
decode at contexts of 512, 1,024, 2,048, 4,096 and 8,192 tokens; analytic network tier,
count-level uniform routing, NCCL all-to-all-v (count level counts every copy), dropless.
Prefill: one sequence of the context per device; decode: ``--sequences`` sequences per
device, each holding the context in its KV cache.

Each case runs as a sweep worker runs it (:func:`moesim.sweep.run.run_case`: validate the
scenario, simulate, take the summary's metrics) in this process, after one warm-up case
that pays the per-process set-up (imports, hardware and model files, the cost model) once,
as a worker pays it once. Prints each case's time, the median and the total, and the
per-process set-up. The target is 0.02 s per case (wall time). ``--cpu`` adds each case's
process CPU time (user + system), steadier than wall time on a shared machine.

When GenZ (pip ``genz-llm``; not a moesim dependency) is importable, its time per
configuration on comparable inputs is printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HARDWARE = ("H100-SXM", "H200")
MODES = ("prefill", "decode")
CONTEXTS = (512, 1024, 2048, 4096, 8192)


def case_scenarios(sequences: int) -> list[dict[str, Any]]:
    """The twenty cases' scenarios, JSON-ready, in a fixed order."""
    out = []
    for hw in HARDWARE:
        for mode in MODES:
            for ctx in CONTEXTS:
                out.append(
                    {
                        "name": f"mixtral-{hw}-{mode}-{ctx}",
                        "hardware": hw,
                        "cluster": {"nodes": 1, "devices_per_node": 8},
                        "model": "Mixtral-8x7B",
                        "routing": {"synthetic": {"distribution": "uniform", "level": "count"}},
                        "mode": mode,
                        "tokens_per_device": ctx if mode == "prefill" else sequences,
                        "sequence_length": ctx,
                        "network": {"tier": "analytic"},
                        "dispatcher": "nccl-alltoallv",  # count level counts every copy
                        "seed": 0,
                    }
                )
    return out


def _genz_seconds() -> float | None:
    """GenZ's time per configuration on prefill/decode of Mixtral-8x7B, when installed."""
    try:
        from GenZ import decode_moddeling, prefill_moddeling  # type: ignore[import-not-found]
    except ImportError:
        return None
    times = []
    for mode in MODES:
        fn = prefill_moddeling if mode == "prefill" else decode_moddeling
        for ctx in CONTEXTS:
            t0 = time.perf_counter()
            fn(
                model="mistralai/Mixtral-8x7B",
                batch_size=1,
                input_tokens=ctx,
                output_tokens=1 if mode == "decode" else 0,
                system_name="H100_GPU",
                bits="bf16",
                tensor_parallel=1,
                expert_parallel=8,
            )
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print figures as JSON")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the 20 cases")
    ap.add_argument("--sequences", type=int, default=64, help="decode sequences per device")
    ap.add_argument("--cpu", action="store_true", help="also print process CPU time per case")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from moesim.scenario import Scenario
    from moesim.sweep.run import run_case
    from moesim.sweep.spec import Case, case_id

    cases = []
    for i, raw in enumerate(case_scenarios(args.sequences)):
        sc = Scenario.model_validate(raw)
        cases.append(Case(i, case_id(sc), {}, sc.model_dump(mode="json")))
    warm = run_case(cases[0], str(REPO), "sweep_speed warm-up")
    setup_s = time.perf_counter() - t0
    if warm.row["status"] != "ok":
        raise SystemExit(f"warm-up case failed: {warm.row['error']}")

    per_case: dict[int, list[float]] = {c.index: [] for c in cases}
    cpu_case: dict[int, list[float]] = {c.index: [] for c in cases}
    for _ in range(args.repeats):
        for case in cases:
            c0 = time.process_time()
            res = run_case(case, str(REPO), f"sweep_speed case {case.index}")
            cpu_case[case.index].append(time.process_time() - c0)
            if res.row["status"] != "ok":
                raise SystemExit(f"case {case.index} failed: {res.row['error']}")
            per_case[case.index].append(res.elapsed_s)
    best = {i: min(ts) for i, ts in per_case.items()}
    best_cpu = {i: min(ts) for i, ts in cpu_case.items()}
    median_s = statistics.median(best.values())
    median_cpu_s = statistics.median(best_cpu.values())
    genz_s = _genz_seconds()
    figures = {
        "cases": len(cases),
        "setup_s": round(setup_s, 3),
        "median_case_s": round(median_s, 4),
        "total_s": round(sum(best.values()), 3),
        "target_case_s": 0.02,
        "genz_case_s": None if genz_s is None else round(genz_s, 4),
        "per_case_s": {cases[i].scenario["name"]: round(s, 4) for i, s in best.items()},
    }
    if args.cpu:
        figures["median_case_cpu_s"] = round(median_cpu_s, 4)
        figures["per_case_cpu_s"] = {
            cases[i].scenario["name"]: round(s, 4) for i, s in best_cpu.items()
        }
    if args.json:
        print(json.dumps(figures, indent=1))
        return
    for i, (name, s) in enumerate(figures["per_case_s"].items()):
        cpu = f"  {best_cpu[i] * 1e3:8.1f} ms CPU" if args.cpu else ""
        print(f"{name:<34} {s * 1e3:8.1f} ms{cpu}")
    print(
        f"\n{len(cases)} cases: median {median_s * 1e3:.1f} ms per case (target 20 ms), "
        f"total {sum(best.values()):.2f} s; per-process set-up {setup_s:.2f} s"
    )
    if args.cpu:
        print(f"CPU time: median {median_cpu_s * 1e3:.1f} ms per case (process, user + system)")
    if genz_s is not None:
        print(f"GenZ: {genz_s * 1e3:.1f} ms per configuration (median, same machine)")
    else:
        print("GenZ not installed (pip install genz-llm in a scratch venv to compare)")


if __name__ == "__main__":
    main()
