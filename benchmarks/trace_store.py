"""Trace store at scale: write a trace, read it back, run ``moesim trace stats`` and
``moesim simulate`` on it, and print each one's peak RSS and time.

    python benchmarks/trace_store.py [--assignments N] [--json]

The trace has DeepSeek-V3's routing shape (256 experts, top-8) over its 58 MoE layers.
Each stage runs in a fresh process, whose own peak RSS is read back with ``os.wait4``.
The simulated scenario replays every token of the trace once (8 devices, one step, the
greedy planner on the trace's loads with one redundant slot per device), on a small model
of that routing shape (58 MoE layers, 256 experts, top-8) so that the run measures
reading the trace, not the engine. The default of 2 x 10^7 assignments takes a minute
or two; the documented figure is for ``--assignments 1e8``, where the target is a peak
RSS under 1.5 GB for each stage.

Routing content is generated cheaply (each token gets k distinct experts at a random
stride), since this measures the store, not the sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

E, K, L = 256, 8, 58
DEVICES = 8
CHUNK = 1 << 18
TARGET_MB = 1536


def _write(out: Path, tokens: int) -> dict:
    from moesim.traces.store import TraceWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    stride = np.arange(K) * (E // K)
    with TraceWriter(
        out,
        num_experts=E,
        top_k=K,
        layers=range(L),
        meta={"model": "benchmark", "source": "benchmarks/trace_store.py"},
    ) as w:
        for start in range(0, tokens, CHUNK):
            n = min(CHUNK, tokens - start)
            tok = np.arange(start, start + n)
            for la in range(L):
                ids = (rng.integers(0, E, size=n)[:, None] + stride[None, :]) % E
                w.write(la, ids, np.full((n, K), 1 / K, np.float32), token=tok, step=start // CHUNK)
    return {"write_s": time.perf_counter() - t0}


def _read(out: Path) -> dict:
    from moesim.traces.store import iter_batches, open_trace

    t0 = time.perf_counter()
    info = open_trace(out)
    total = 0
    checksum = 0
    for group in iter_batches(info):
        for b in group.values():
            total += b.expert_ids.size
            checksum += int(b.expert_ids[:, 0].sum())
    return {"read_s": time.perf_counter() - t0, "read_assignments": total, "checksum": checksum}


def _scenario(path: Path, trace: Path, tokens: int) -> None:
    """A scenario that replays each of the trace's ``tokens`` tokens once on 8 devices."""
    model = {
        "name": "trace-store-benchmark",
        "num_layers": L,
        "d_model": 256,
        "expert_d_ff": 128,
        "num_experts": E,
        "top_k": K,
        "attention": {"kind": "mha", "num_heads": 4},
        "vocab_size": 256,
        "source": "benchmarks/trace_store.py: DeepSeek-V3's routing shape, small layers",
    }
    path.write_text(
        yaml.safe_dump(
            {
                "name": "trace-store-benchmark",
                "hardware": "H100-SXM",
                "cluster": {"nodes": 1, "devices_per_node": DEVICES},
                "model": model,
                "routing": {"trace": str(trace)},
                "placement": "greedy",
                "redundant_slots": DEVICES,
                "capacity": {"factor": None},
                "mode": "prefill",
                "tokens_per_device": -(-tokens // DEVICES),
                "sequence_length": 128,
                "precision": "bf16",
                "steps": 1,
                "seed": 0,
            }
        )
    )


def _child(kind: str, out: str, tokens: int) -> None:
    res = _write(Path(out), tokens) if kind == "write" else _read(Path(out))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def _measured(cmd: list[str]) -> tuple[str, float, float]:
    """Run ``cmd``; its stdout, wall seconds and peak RSS in MB (its own, from wait4)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {stderr.decode()[-2000:]}")
    return stdout.decode(), wall, usage.ru_maxrss / 1024


def _run(kind: str, out: Path, tokens: int) -> dict:
    stdout, _, rss = _measured([sys.executable, __file__, "--child", kind, str(out), str(tokens)])
    return json.loads(stdout.strip().splitlines()[-1]) | {"peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--assignments", type=float, default=2e7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    tokens = max(1, int(args.assignments) // (K * L))
    tmp = Path(tempfile.mkdtemp(prefix="moesim-bench-"))
    moesim = [sys.executable, "-m", "moesim"]
    try:
        out = tmp / "trace"
        w = _run("write", out, tokens)
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        r = _run("read", out, tokens)
        stats_out, stats_s, stats_rss = _measured([*moesim, "trace", "stats", str(out), "--json"])
        scenario = tmp / "scenario.yaml"
        _scenario(scenario, out, tokens)
        run = [*moesim, "simulate", str(scenario), "--out", str(tmp / "run")]
        _, sim_s, sim_rss = _measured(run)
        simulated = json.loads((tmp / "run" / "summary.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = tokens * K * L
    assert r["read_assignments"] == n
    assert json.loads(stats_out)["assignments"] == n
    fig = {
        "assignments": n,
        "tokens_per_layer": tokens,
        "layers": L,
        "num_experts": E,
        "top_k": K,
        "bytes_on_disk": size,
        "write_s": round(w["write_s"], 2),
        "write_peak_rss_mb": round(w["peak_rss_mb"], 1),
        "read_s": round(r["read_s"], 2),
        "read_peak_rss_mb": round(r["peak_rss_mb"], 1),
        "stats_s": round(stats_s, 2),
        "stats_peak_rss_mb": round(stats_rss, 1),
        "simulate_s": round(sim_s, 2),
        "simulate_peak_rss_mb": round(sim_rss, 1),
        "simulate_assignments": simulated["runs"][0]["assignments"],
        "write_rate_m_per_s": round(n / w["write_s"] / 1e6, 1),
        "read_rate_m_per_s": round(n / r["read_s"] / 1e6, 1),
        "target_peak_rss_mb": TARGET_MB,
    }
    if args.json:
        print(json.dumps(fig, indent=2))
        return
    print(
        f"{n:,} assignments ({L} layers x {tokens:,} tokens x top-{K}), "
        f"{size / 1e6:,.0f} MB on disk; peak RSS target < {TARGET_MB} MB at 10^8"
    )
    print(
        f"  write:    {fig['write_s']} s ({fig['write_rate_m_per_s']} M/s), "
        f"peak RSS {fig['write_peak_rss_mb']} MB"
    )
    print(
        f"  read:     {fig['read_s']} s ({fig['read_rate_m_per_s']} M/s), "
        f"peak RSS {fig['read_peak_rss_mb']} MB"
    )
    print(f"  stats:    {fig['stats_s']} s, peak RSS {fig['stats_peak_rss_mb']} MB")
    print(
        f"  simulate: {fig['simulate_s']} s (every token replayed once on {DEVICES} devices), "
        f"peak RSS {fig['simulate_peak_rss_mb']} MB"
    )


if __name__ == "__main__":
    main()
