"""``moesim trace stats`` throughput, against a bare numpy bincount of the same ids.

    python benchmarks/trace_stats.py [--assignments N] [--repeats R] [--json]

Builds a trace (256 experts, top-8, 8 layers; zipf-skewed routing), then times the full
statistics pass (expert counts, entropy, co-activated pairs, cross-layer affinities,
reading and checking the Parquet files included; the best of R runs, so the compiled
counting kernel's one-time load is left out) and, in the same run, one ``np.bincount``
over all the ids already in memory. Targets (issue 21): at least 20 M assignments/s, and
at least 0.3 of the bare bincount's rate; both are printed with pass or fail. For
reference it also times two parts of the pass on their own:

* decoding the columns every reader decodes and checks (token, expert ids, gate
  weights), the floor of any statistics pass over the files;
* counting alone: the compiled kernel over the ids already in memory, one thread, the
  figures ``trace stats`` reports (per token at top-8: 8 expert counts, 28 co-activated
  pairs, 64 cross-layer pairs, where the bare bincount makes 8), with no file read.

Each part's rate over the bare bincount's says how far a whole pass can get to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moesim.traces.stats import trace_stats
from moesim.traces.store import iter_layer_batches, open_trace
from moesim.traces.synthetic import synth_to_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--assignments", type=float, default=2e7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    e, k, layers = 256, 8, 8
    tokens = int(args.assignments) // (k * layers)
    tmp = Path(tempfile.mkdtemp(prefix="moesim-bench-"))
    try:
        path = synth_to_store(
            tmp / "t",
            num_experts=e,
            top_k=k,
            num_layers=layers,
            num_tokens=tokens,
            distribution="zipf:0.8",
            seed=0,
        )
        n = tokens * k * layers
        stats_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            trace_stats(path)
            stats_s.append(time.perf_counter() - t0)
        # layer after layer, so that ids.reshape(layers, -1, k)[li] is layer li's rows
        ids = np.concatenate(
            [b.expert_ids.reshape(-1) for b in iter_layer_batches(open_trace(path), weights=False)]
        )
        bare = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            np.bincount(ids, minlength=e)
            bare.append(time.perf_counter() - t0)
        from moesim.traces._compiled import layer_counts_kernel

        per_layer = ids.reshape(layers, -1, k)
        layer_counts_kernel(per_layer[0][:8], per_layer[0][:8], True, e)  # compile/load once
        counting = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for li in range(layers):
                layer_counts_kernel(per_layer[li], per_layer[li - 1], li > 0, e)
            counting.append(time.perf_counter() - t0)
        decode = []
        files = sorted(path.glob("layer=*/*.parquet"))
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for f in files:
                for _rb in pq.ParquetFile(f).iter_batches(
                    batch_size=1 << 17, columns=["token", "expert_ids", "gate_weights"]
                ):
                    pass
            decode.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = n / min(stats_s) / 1e6
    bare_rate = n / min(bare) / 1e6
    fig = {
        "assignments": n,
        "stats_s": round(min(stats_s), 3),
        "stats_rate_m_per_s": round(rate, 1),
        "bare_bincount_rate_m_per_s": round(bare_rate, 1),
        "stats_over_bare": round(rate / bare_rate, 3),
        "decode_only_rate_m_per_s": round(n / min(decode) / 1e6, 1),
        "decode_over_bare": round(n / min(decode) / 1e6 / bare_rate, 3),
        "counting_only_rate_m_per_s": round(n / min(counting) / 1e6, 1),
        "counting_over_bare": round(n / min(counting) / 1e6 / bare_rate, 3),
        "target_m_per_s": 20.0,
        "target_over_bare": 0.3,
        "rate_pass": rate >= 20.0,
        "ratio_pass": rate / bare_rate >= 0.3,
    }
    if args.json:
        print(json.dumps(fig, indent=2))
    else:
        verdict = {True: "pass", False: "FAIL"}
        print(
            f"trace stats over {n:,} assignments: {fig['stats_s']} s = "
            f"{fig['stats_rate_m_per_s']} M assignments/s (target >= 20: "
            f"{verdict[fig['rate_pass']]})\n"
            f"bare np.bincount of the same ids in memory: {fig['bare_bincount_rate_m_per_s']} M/s;"
            f" stats / bare = {fig['stats_over_bare']} (target >= 0.3: "
            f"{verdict[fig['ratio_pass']]})\n"
            f"decoding the token, expert_ids and gate_weights columns alone: "
            f"{fig['decode_only_rate_m_per_s']} M/s (/ bare = {fig['decode_over_bare']})\n"
            f"counting alone (compiled kernel, ids in memory, one thread): "
            f"{fig['counting_only_rate_m_per_s']} M/s (/ bare = {fig['counting_over_bare']})"
        )


if __name__ == "__main__":
    main()
