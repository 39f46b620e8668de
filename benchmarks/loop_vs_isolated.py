"""What the event loop changes: the same flow-tier steps run with transfers in the loop and
with the model before it, where each exchange was timed alone.

    python benchmarks/loop_vs_isolated.py [--json]

*Isolated* (moesim before issue 18): every exchange's per-device time comes from its
flows simulated alone, all starting together, and a device starts it once every device it
receives from is ready; the gradient all-reduce buckets take the ring's closed-form time.
Nothing from two exchanges ever meets on a link. *Loop* (now): a device's flows start
when it is ready and share every link with everything in flight
(:mod:`moesim.sim.fabric`). Both use the same routing, program and tolerance.

Cases, OLMoE-1B-7B (16 MoE layers, 64 experts, top-8) on 4 nodes x 8 H100, 4,096 tokens
per device, Zipf-1.0 routing (uniform where named), contiguous placement, one leaf per
node so every cross-node byte crosses a spine:

* ``overlap-uniform-4to1``, ``overlap-4to1``: two-microbatch overlap (prefill) on a 4:1
  oversubscribed spine: one microbatch's dispatch meets the other's combine there;
* ``straggler-2to1``: device 3 computes 1.5x slower (prefill, 2:1 spine): its peers' flows
  no longer wait for it, and its own late flows get the links to themselves;
* ``training``: a training step, non-blocking spine: the gradient all-reduce buckets share
  the NICs with the backward all-to-alls.

Prints the step time both ways and the mean per-device time in all-to-alls and the
all-reduce (µs); ``--json`` gives one entry per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim.scenario import load_scenario  # noqa: E402
from moesim.sim.engine import Exchange, Op, Records, run_program  # noqa: E402
from moesim.sim.exchange import exchange_times  # noqa: E402
from moesim.sim.prepare import Prepared, prepare  # noqa: E402
from moesim.sim.simulate import simulate_mode  # noqa: E402

BASE = """name: loop-vs-isolated
hardware: H100-SXM
cluster: {{nodes: 4, devices_per_node: 8}}
model: OLMoE-1B-7B
routing: {{synthetic: {{distribution: "{dist}", seed: 0, level: token}}}}  # as published
placement: contiguous
capacity: {{factor: null}}
network: {{tier: flow, nodes_per_leaf: 1, oversubscription: {over}}}
tokens_per_device: 4096
sequence_length: 4096
precision: bf16
# the traffic the published figures were measured with: a copy per (token, expert), BF16,
# no fixed cost per call, no SMs taken from overlapped compute
dispatcher: {{preset: nccl-alltoallv, launches: 0, syncs: 0, sms: 0}}
mode: {mode}
overlap: {overlap}
{extra}
"""

_ZIPF = {"dist": "zipf:1.0", "extra": ""}
CASES: dict[str, dict[str, Any]] = {
    "overlap-uniform-4to1": _ZIPF
    | {"dist": "uniform", "over": 4, "mode": "prefill", "overlap": "true"},
    "overlap-4to1": _ZIPF | {"over": 4, "mode": "prefill", "overlap": "true"},
    "straggler-2to1": _ZIPF
    | {
        "over": 2,
        "mode": "prefill",
        "overlap": "false",
        "extra": "stragglers: {slow_devices: {3: 1.5}}",
    },
    "training": _ZIPF | {"over": 1, "mode": "training", "overlap": "false"},
}


def isolated(program: list[Op], prep: Prepared) -> list[Op]:
    """The program as the model before the loop timed it: each flow exchange alone."""
    topo, hw, tol = prep.cluster.topology, prep.hw, prep.cluster.flow_rel_tol
    d = prep.cluster.num_devices
    out: list[Op] = []
    for op in program:
        if isinstance(op, Exchange) and op.flows is not None:
            fs = op.flows
            if fs.barrier:  # the all-reduce: its ring's closed-form time
                assert op.port_limited_us is not None
                dur = op.port_limited_us
            else:
                m = np.zeros((d, d))
                m[fs.src, fs.dst] = fs.nbytes * fs.scale
                dur = exchange_times(m, topo, hw, "flow", rel_tol=tol).time_us
            op = replace(op, duration_us=dur, flows=None)
        out.append(op)
    return out


def _per_device(program: list[Op], rec: Records, cats: set[str]) -> float:
    rows = [i for i, op in enumerate(program) if op.category in cats]
    return float(rec.duration_us[rows].sum(axis=0).mean()) if rows else 0.0


def run_case(name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text(BASE.format(**CASES[name]))
        sc, base = load_scenario(path)
        prep = prepare(sc, base)
    mode = sc.modes[0]
    loop = simulate_mode(prep, mode)
    prog = loop.program
    old_prog = isolated(prog, prep)
    old = run_program(old_prog, prep.cluster.num_devices)
    new = loop.records[-1]
    again = run_program(prog, prep.cluster.num_devices, prep.cluster.fabric())  # reproduced
    assert np.array_equal(again.end_us, new.end_us)
    a2a = {"dispatch", "combine"}
    return {
        "case": name,
        "devices": prep.cluster.num_devices,
        "loop_step_us": float(new.end_us.max()),
        "isolated_step_us": float(old.end_us.max()),
        "step_change": float(new.end_us.max() / old.end_us.max() - 1),
        "loop_a2a_us": _per_device(prog, new, a2a),
        "isolated_a2a_us": _per_device(old_prog, old, a2a),
        "loop_allreduce_us": _per_device(prog, new, {"allreduce"}),
        "isolated_allreduce_us": _per_device(old_prog, old, {"allreduce"}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [run_case(c) for c in args.cases]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("case            step: isolated -> loop (change) | mean a2a per device | all-reduce")
    for r in rows:
        print(
            f"{r['case']:15s} {r['isolated_step_us']:10,.0f} -> {r['loop_step_us']:10,.0f} us "
            f"({r['step_change']:+.1%}) | {r['isolated_a2a_us']:9,.0f} -> "
            f"{r['loop_a2a_us']:9,.0f} us | {r['isolated_allreduce_us']:8,.0f} -> "
            f"{r['loop_allreduce_us']:8,.0f} us"
        )


if __name__ == "__main__":
    main()
