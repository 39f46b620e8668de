"""``moesim trace synth``: generating token-level routing against writing it to Parquet.

    python benchmarks/synth_speed.py [--tokens N] [--layers L] [--repeats R] [--json]

For DeepSeek-V3's routing shape (256 experts, top-8, zipf:1.2 popularity) over L MoE
layers, plain and group-limited (8 groups, each token within 4, as DeepSeek-V3 routes),
times separately

* generation: :func:`moesim.traces.synthetic.synthesize`, the same sampler and chunks
  ``moesim trace synth`` streams, into memory;
* writing: those arrays through :class:`moesim.traces.store.TraceWriter` in the chunks
  ``moesim trace synth`` writes (checks, Parquet encoding, zstd);

and prints both (the best of R runs each, alternating) and their ratio. Target (issue
21): generation no slower than its write, a ratio of at most 1. Process CPU seconds are
printed beside wall seconds, since on a shared machine wall time also counts other
processes' work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.traces.store import TraceWriter
from moesim.traces.synthetic import CHUNK_TOKENS, synthesize

E, K, DIST = 256, 8, "zipf:1.2"


def _timed(fn):  # type: ignore[no-untyped-def]
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _write(trace, dest: Path) -> None:  # type: ignore[no-untyped-def]
    with TraceWriter(dest, num_experts=E, top_k=K, layers=trace.layers, meta=trace.meta) as w:
        for start in range(0, trace.num_tokens, CHUNK_TOKENS):
            stop = min(start + CHUNK_TOKENS, trace.num_tokens)
            tok = np.arange(start, stop, dtype=np.int64)
            for li, la in enumerate(trace.layers):
                w.write(
                    la,
                    trace.expert_ids[li, start:stop],
                    trace.gate_weights[li, start:stop],
                    token=tok,
                    step=0,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="moesim-bench-"))
    try:
        for name, groups in (("plain", None), ("groups 8, within 4", (8, 4))):
            gen, write = [], []
            for _ in range(args.repeats):  # the best of each, generation and write alternating
                trace, *g = _timed(
                    lambda groups=groups: synthesize(
                        num_experts=E,
                        top_k=K,
                        num_layers=args.layers,
                        num_tokens=args.tokens,
                        distribution=DIST,
                        seed=0,
                        groups=groups,
                    )
                )
                _, *w = _timed(lambda trace=trace: _write(trace, tmp / "t"))
                shutil.rmtree(tmp / "t")
                gen.append(g)
                write.append(w)
            gen_s, gen_cpu = min(x[0] for x in gen), min(x[1] for x in gen)
            write_s, write_cpu = min(x[0] for x in write), min(x[1] for x in write)
            rows.append(
                {
                    "routing": name,
                    "assignments": args.tokens * args.layers * K,
                    "generate_s": round(gen_s, 3),
                    "write_s": round(write_s, 3),
                    "generate_over_write": round(gen_s / write_s, 3),
                    "generate_cpu_s": round(gen_cpu, 3),
                    "write_cpu_s": round(write_cpu, 3),
                    "generate_over_write_cpu": round(gen_cpu / write_cpu, 3),
                    "pass": gen_s <= write_s,
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{args.layers} layers x {args.tokens:,} tokens x top-{K} of {E} experts, {DIST}; "
        "target: generate <= write"
    )
    for r in rows:
        verdict = "pass" if r["pass"] else "FAIL"
        print(
            f"  {r['routing']:20s} generate {r['generate_s']:.2f} s, write {r['write_s']:.2f} s: "
            f"ratio {r['generate_over_write']:.2f} ({verdict}); CPU {r['generate_cpu_s']:.2f} s "
            f"vs {r['write_cpu_s']:.2f} s, ratio {r['generate_over_write_cpu']:.2f}"
        )


if __name__ == "__main__":
    main()
