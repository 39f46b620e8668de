"""Engine scale: one DeepSeek-V3-shaped training step on N devices.

    python benchmarks/engine_scale.py --devices N [N ...] [--network flow|analytic]
        [--granularity device|rail|node|auto] [--tol R] [--tokens-per-device T] [--json]
    python benchmarks/engine_scale.py --devices N --one-exchange [--json]

58 MoE layers of 256 routed experts, top-8, hidden 7168 (the DeepSeek-V3 preset) on H800
nodes of 8, zipf:0.8-skewed synthetic routing at count level (each device's per-expert
counts drawn directly; ``--level token`` draws every token's experts instead), FP8
dispatch. Each size runs in a fresh process and prints wall time (total, and the
preparation / simulation stages), CPU time (the steadier figure on a shared machine;
numpy may use more than one core, so it can exceed the wall time), engine events (op
completions and the fabric's clock events), events per second, and in the flow tier the
granularity used (``--granularity auto``: device flows up to 256 devices, node bundles
beyond; ``rail``: DeepEP's path) with its tolerance (``--tol``, network.flow_rel_tol) and
hot-device factor (``--hot``, network.hot_device), the flows released and the max-min rate
recomputations; and peak RSS. Issue 18 targets, at 2,048 devices and 4,096 tokens per
device: <= 60 s with the flow tier at the granularity auto picks, <= 5 s analytic, a
256-device step with device flows <= 120 s, and cost from 256 to 2,048 devices growing
<= 10x.

``--one-exchange`` times a single flow-tier exchange alone (the first MoE layer's
dispatch, as ``moesim a2a`` would): its flows, the max-min rate recomputations, the wall
time, and what a step of such isolated exchanges would take (``step_projection_s``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _model() -> str:
    """DeepSeek-V3's shape without its group limit (count-level routing draws each
    expert's marginal load, which a group limit changes under skewed popularity), as the
    published figures were measured."""
    sys.path.insert(0, str(REPO))
    from moesim.model.shapes import get_preset

    shape = get_preset("DeepSeek-V3").model_dump(exclude_none=True)
    for key in ("expert_groups", "groups_per_token"):
        shape.pop(key, None)
    return json.dumps(shape)


def _scenario(
    devices: int,
    tokens: int,
    network: str,
    level: str = "count",
    granularity: str = "auto",
    tol: float = 0.01,
    hot: float = 1.1,
) -> str:
    return f"""name: engine-scale
hardware: H800
cluster: {{nodes: {devices // 8}, devices_per_node: 8}}
model: {_model()}
routing: {{synthetic: {{distribution: "zipf:0.8", seed: 0, level: {level}}}}}
placement: contiguous
network: {{tier: {network}, granularity: {granularity}, flow_rel_tol: {tol}, hot_device: {hot}}}
mode: training
tokens_per_device: {tokens}
sequence_length: 4096
precision: fp8
# the traffic the published figures were measured with: a copy per (token, expert), FP8
# dispatch, BF16 otherwise, no fixed cost per call
dispatcher: {{preset: nccl-alltoallv, dispatch_dtype: fp8, launches: 0, syncs: 0}}
"""


def _prepare(devices: int, tokens: int, network: str, **options: Any) -> Any:
    """The scale scenario (``options``: those of :func:`_scenario`) loaded and prepared
    (synthetic routing generated)."""
    sys.path.insert(0, str(REPO))
    from moesim.scenario import load_scenario
    from moesim.sim.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text(_scenario(devices, tokens, network, **options))
        sc, base = load_scenario(path)
        return prepare(sc, base)


def _child(
    devices: int, tokens: int, network: str, level: str, granularity: str, tol: float, hot: float
) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    prep = _prepare(
        devices, tokens, network, level=level, granularity=granularity, tol=tol, hot=hot
    )
    t1 = time.perf_counter()
    from moesim.sim.simulate import simulate_mode

    run = simulate_mode(prep, "training")
    t2, c2 = time.perf_counter(), time.process_time()
    events = run.summary["events"]
    return {
        "devices": devices,
        "network": network,
        "tokens_per_device": tokens,
        "routing_level": level,
        "wall_s": round(t2 - t0, 3),
        "cpu_s": round(c2 - c0, 3),
        "prepare_s": round(t1 - t0, 3),
        "simulate_s": round(t2 - t1, 3),
        "events": events,
        "events_per_s": round(events / (t2 - t1), 1),
        "flow_events": run.summary["flow_events"],
        "granularity": run.summary["granularity"],
        "rel_tol": tol if network == "flow" else None,
        "hot_device": hot if run.summary["granularity"] == "node" else None,
        "flows": sum(r.flows for r in run.records),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "step_time_us": run.summary["step_time_us"],
    }


def _child_exchange(devices: int, tokens: int) -> dict:
    """One flow-tier exchange of the scale scenario: the first MoE layer's dispatch."""
    import numpy as np

    prep = _prepare(devices, tokens, "flow")
    from moesim.costs.roofline import bytes_per_assignment
    from moesim.sim.exchange import exchange_times
    from moesim.sim.replay import route_layer_at

    sc = prep.scenario
    copies = route_layer_at(prep, 0, 0).copies
    assert copies is not None
    topo, hw = prep.cluster.topology, prep.hw
    exchange_times(np.ones((8, 8)), topo, hw, "flow")  # compiled kernels loaded first
    scale = bytes_per_assignment(prep.shape.d_model, prep.dispatcher.dispatch_dtype)
    t0 = time.perf_counter()
    res = exchange_times(copies, topo, hw, "flow", scale=scale, rel_tol=sc.network.flow_rel_tol)
    wall = time.perf_counter() - t0
    per_step = 2 * len(prep.moe_layers)
    return {
        "devices": devices,
        "network": "flow",
        "tokens_per_device": tokens,
        "exchange_flows": int(np.count_nonzero(copies) - np.count_nonzero(np.diagonal(copies))),
        "exchange_recomputations": res.events,
        "exchange_wall_s": round(wall, 3),
        "flow_exchanges_per_step": per_step,
        "step_projection_s": round(wall * per_step, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[64])
    ap.add_argument("--network", choices=["analytic", "flow"], default="analytic")
    ap.add_argument("--tokens-per-device", type=int, default=4096)
    ap.add_argument("--level", choices=["count", "token"], default="count")
    ap.add_argument(
        "--granularity",
        choices=["device", "rail", "node", "auto"],
        default="auto",
        help="the flow tier's (network.granularity); auto: device up to 256 devices",
    )
    ap.add_argument("--tol", type=float, default=0.01, help="the flow tier's network.flow_rel_tol")
    ap.add_argument("--hot", type=float, default=1.1, help="node granularity's network.hot_device")
    ap.add_argument(
        "--one-exchange", action="store_true", help="time one flow-tier exchange (see above)"
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.one_exchange:
        print(json.dumps(_child_exchange(args.devices[0], args.tokens_per_device)))
        return
    if args.child:
        print(
            json.dumps(
                _child(
                    args.devices[0],
                    args.tokens_per_device,
                    args.network,
                    args.level,
                    args.granularity,
                    args.tol,
                    args.hot,
                )
            )
        )
        return
    rows = []
    for n in args.devices:
        if n % 8:
            sys.exit(f"--devices {n}: must be a multiple of 8 (H800 nodes)")
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--devices",
                str(n),
                "--network",
                args.network,
                "--tokens-per-device",
                str(args.tokens_per_device),
                "--level",
                args.level,
                "--granularity",
                args.granularity,
                "--tol",
                str(args.tol),
                "--hot",
                str(args.hot),
                *(["--one-exchange"] if args.one_exchange else []),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(proc.stderr.strip().splitlines()[-1])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return
    for r in rows:
        if args.one_exchange:
            print(
                f"{r['devices']:5d} devices, one flow exchange: {r['exchange_flows']:,} flows, "
                f"{r['exchange_recomputations']:,} rate recomputations, "
                f"{r['exchange_wall_s']:.2f} s; a step ({r['flow_exchanges_per_step']} such "
                f"exchanges) would take about {r['step_projection_s']:,.0f} s; "
                f"peak RSS {r['peak_rss_mb']} MB"
            )
            continue
        print(
            f"{r['devices']:5d} devices, {r['network']:8s}: {r['wall_s']:8.2f} s "
            f"(CPU {r['cpu_s']:.2f} s) "
            f"(routing generation {r['prepare_s']:.2f} s, simulation {r['simulate_s']:.2f} s), "
            f"{r['events']:,} events ({r['events_per_s']:,.0f}/s), "
            + (
                f"granularity {r['granularity']} (tol {r['rel_tol']}"
                + (f", hot {r['hot_device']}" if r["hot_device"] else "")
                + f"), {r['flows']:,} flows, "
                f"{r['flow_events']:,} flow-rate recomputations, "
                if r["granularity"]
                else ""
            )
            + f"peak RSS {r['peak_rss_mb']} MB"
        )


if __name__ == "__main__":
    main()
