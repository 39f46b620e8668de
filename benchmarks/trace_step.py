"""A 64-device DeepSeek-V3 training step at token level, replayed from a trace.

    python benchmarks/trace_step.py [--trace DIR] [--keep DIR] [--dist D] [--json]
        [--nodes N] [--tokens-per-device T]

Issue 21's target: one training step of DeepSeek-V3 on 64 devices (8 H800 nodes of 8),
replaying a trace of 4,096 tokens per rank, in <= 30 s of wall time on a 2-core machine.
(``--nodes`` and ``--tokens-per-device`` change the size: 8 nodes of 8 and 4,096 tokens by
default.)

1. A DeepSeek-V3-shaped trace (256 experts, top-8, 58 MoE layers, 64 x 4,096 = 262,144
   tokens, ``--dist``-skewed: zipf:0.8 by default; ``moesim trace synth`` draws no group
   limit) is written once with ``moesim trace synth`` into a temporary folder, or taken
   from ``--trace DIR`` (written there when the folder does not exist yet; the scenario is
   then written beside it, so that its path, which the outputs name, stays the same from
   run to run). Its time is printed but not counted.
2. ``moesim simulate`` of the scenario below, in a fresh process, is timed end to end
   (interpreter start and imports included), and split into stages: start-up (the
   interpreter, imports, the scenario file), trace read (:func:`read_replay`), the rest
   of preparation (model, hardware, placement, topology), routing (every MoE layer routed
   onto the placement: replica choice, loads, DeepEP's one copy per destination node),
   the program built around it, the engine, and the outputs written (report, timeline,
   frames). Peak RSS is the simulating process's.

The scenario: DeepSeek-V3 (the preset, group limit included) in training, FP8, DeepEP's
normal kernels (``deepep-normal``: node de-duplication), contiguous placement, dropless,
the analytic network tier, ``tokens_per_device: 4096`` (one microbatch of one 4,096-token
sequence) replaying the trace. ``--keep DIR`` keeps the run's outputs there (to compare
them byte for byte between versions).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXPERTS, TOP_K, LAYERS = 256, 8, 58

SCENARIO = """name: deepseek-v3-trace-ep{devices}
hardware: H800
cluster: {{nodes: {nodes}, devices_per_node: 8}}
model: DeepSeek-V3
routing: {{trace: {trace}}}
placement: contiguous
capacity: {{factor: null}}
mode: training
tokens_per_device: {tokens}          # one microbatch of one sequence
sequence_length: 4096
precision: fp8
dispatcher: deepep-normal
seed: 0
"""


def _synth(dest: Path, dist: str, tokens: int) -> float:
    """Write a trace of ``tokens`` tokens with ``moesim trace synth``; its wall time in
    seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "moesim", "trace", "synth", "--experts", str(EXPERTS)]
    cmd += ["--top-k", str(TOP_K), "--layers", str(LAYERS), "--tokens", str(tokens)]
    cmd += ["--dist", dist, "--seed", "0", "--out", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"trace synth failed: {proc.stderr.strip()}")
    return time.perf_counter() - t0


def _timed(module: Any, name: str, stages: dict[str, float], key: str) -> None:
    """Replace ``module.name`` by a wrapper adding its wall time to ``stages[key]``."""
    inner: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            stages[key] = stages.get(key, 0.0) + time.perf_counter() - t0

    setattr(module, name, wrapper)


def _child(scenario: str, out: str, figures: str) -> None:
    """``moesim simulate SCENARIO --out OUT`` in this process, its stages timed; the
    figures written as JSON to ``figures``."""
    sys.path.insert(0, str(REPO))
    import moesim.report
    import moesim.sim.prepare
    import moesim.sim.replay
    import moesim.sim.simulate
    from moesim.cli import main

    stages: dict[str, float] = {}
    _timed(moesim.sim.prepare, "read_replay", stages, "trace_read_s")
    _timed(moesim.sim.prepare, "prepare", stages, "prepare_s")
    _timed(moesim.sim.replay, "route_layer_at", stages, "routing_s")
    _timed(moesim.sim.simulate, "run_program", stages, "engine_s")
    _timed(moesim.sim.simulate, "simulate_prepared", stages, "simulate_s")
    _timed(moesim.report, "write_outputs", stages, "outputs_s")
    sys.argv = ["moesim", "simulate", scenario, "--out", out, "--force"]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    stages["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(figures).write_text(json.dumps(stages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", type=Path, help="trace folder: reused, or written there")
    ap.add_argument("--dist", default="zipf:0.8", help="trace synth --dist (default zipf:0.8)")
    ap.add_argument("--keep", type=Path, help="keep the run's outputs in this folder")
    ap.add_argument("--nodes", type=int, default=8, help="H800 nodes of 8 (default 8)")
    ap.add_argument("--tokens-per-device", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    devices, tokens = 8 * args.nodes, args.tokens_per_device
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace if args.trace is not None else Path(tmp) / "trace"
        synth_s = None if trace.exists() else _synth(trace, args.dist, devices * tokens)
        folder = trace.resolve().parent if args.trace is not None else Path(tmp)
        scenario = folder / f"{trace.name}-step.yaml"
        scenario.write_text(
            SCENARIO.format(
                devices=devices, nodes=args.nodes, tokens=tokens, trace=json.dumps(trace.name)
            )
        )
        out = args.keep if args.keep is not None else Path(tmp) / "out"
        figures = Path(tmp) / "figures.json"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(scenario), str(out), str(figures)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"simulate failed: {proc.stderr.strip()}")
        st = json.loads(figures.read_text())
        summary = json.loads((out / "summary.json").read_text())
    timed = ("prepare_s", "simulate_s", "outputs_s")
    row = {
        "devices": devices,
        "tokens_per_device": tokens,
        "trace_synth_s": None if synth_s is None else round(synth_s, 1),
        "wall_s": round(wall, 2),
        "startup_s": round(wall - sum(st.get(k, 0.0) for k in timed), 2),
        "trace_read_s": round(st.get("trace_read_s", 0.0), 2),
        "prepare_rest_s": round(st.get("prepare_s", 0.0) - st.get("trace_read_s", 0.0), 2),
        "routing_s": round(st.get("routing_s", 0.0), 2),
        "program_s": round(
            st.get("simulate_s", 0.0) - st.get("routing_s", 0.0) - st.get("engine_s", 0.0), 2
        ),
        "engine_s": round(st.get("engine_s", 0.0), 2),
        "outputs_s": round(st.get("outputs_s", 0.0), 2),
        "peak_rss_mb": round(st["peak_rss_mb"], 1),
        "step_time_us": summary["runs"][0]["step_time_us"],
        "target_s": 30.0,
    }
    if args.json:
        print(json.dumps(row, indent=2))
        return
    if row["trace_synth_s"] is not None:
        print(f"trace synth (not counted): {row['trace_synth_s']:.1f} s")
    print(
        f"DeepSeek-V3 training step, {devices} devices x {tokens} tokens from a trace: "
        f"{row['wall_s']:.2f} s wall (target <= 30 s), peak RSS {row['peak_rss_mb']} MB"
    )
    for k in (
        "startup_s",
        "trace_read_s",
        "prepare_rest_s",
        "routing_s",
        "program_s",
        "engine_s",
        "outputs_s",
    ):
        print(f"  {k.removesuffix('_s'):15s} {row[k]:8.2f} s")
    print(f"  step time {row['step_time_us']} us")


if __name__ == "__main__":
    main()
