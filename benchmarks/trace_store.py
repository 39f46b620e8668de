"""Trace store at scale: write and read a 10^8-assignment trace, print peak RSS and rates.

    python benchmarks/trace_store.py [--assignments N] [--json]

The trace has DeepSeek-V3's routing shape (256 experts, top-8) over 8 layers. Writing and
reading each run in a fresh process so each peak RSS is its own. Target: peak RSS under
1.5 GB for 10^8 assignments (issue 3).

Routing content is generated cheaply (each token gets k distinct experts at a random
stride), since this measures the store, not the sampler.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

E, K, L = 256, 8, 8
CHUNK = 1 << 18


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


def _child(kind: str, out: str, tokens: int) -> None:
    res = _write(Path(out), tokens) if kind == "write" else _read(Path(out))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def _run(kind: str, out: Path, tokens: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(out), str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--assignments", type=float, default=1e8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    tokens = int(args.assignments) // (K * L)
    tmp = Path(tempfile.mkdtemp(prefix="moesim-bench-"))
    try:
        out = tmp / "trace"
        w = _run("write", out, tokens)
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        r = _run("read", out, tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = tokens * K * L
    fig = {
        "assignments": n,
        "tokens_per_layer": tokens,
        "layers": L,
        "num_experts": E,
        "top_k": K,
        "write_s": round(w["write_s"], 2),
        "write_peak_rss_mb": round(w["peak_rss_mb"], 1),
        "read_s": round(r["read_s"], 2),
        "read_peak_rss_mb": round(r["peak_rss_mb"], 1),
        "write_rate_m_per_s": round(n / w["write_s"] / 1e6, 1),
        "read_rate_m_per_s": round(n / r["read_s"] / 1e6, 1),
        "bytes_on_disk": size,
        "target_peak_rss_mb": 1536,
    }
    assert r["read_assignments"] == n
    if args.json:
        print(json.dumps(fig, indent=2))
    else:
        print(
            f"{n:,} assignments ({L} layers x {tokens:,} tokens x top-{K}), "
            f"{size / 1e6:,.0f} MB on disk"
        )
        print(
            f"  write: {fig['write_s']} s ({fig['write_rate_m_per_s']} M/s), "
            f"peak RSS {fig['write_peak_rss_mb']} MB"
        )
        print(
            f"  read:  {fig['read_s']} s ({fig['read_rate_m_per_s']} M/s), "
            f"peak RSS {fig['read_peak_rss_mb']} MB   (target < 1536 MB)"
        )


if __name__ == "__main__":
    main()
