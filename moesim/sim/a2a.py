"""The all-to-all microbenchmark behind ``moesim a2a``: one dispatch and one combine.

T tokens per rank pick top-k experts (uniformly at random, within the model's group limit
when ``model`` names one that has it, or from a trace); E experts are placed contiguously
over N ranks and routed by the simulator's own routing step
(:func:`moesim.sim.routing.route_layer`, dropless); dispatch and combine copies, their
dtypes and the fixed cost of each call follow the dispatcher (:mod:`moesim.dispatchers`),
any of them overridden; both exchanges are timed in the chosen network tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moesim.costs.roofline import bytes_per_assignment
from moesim.dispatchers import Dedup, DispatcherChoice, Wire
from moesim.errors import InputError
from moesim.hardware import get_profile
from moesim.placement.base import contiguous
from moesim.scenario import FLOW_REL_TOL
from moesim.sim.exchange import Tier, exchange_times
from moesim.sim.routing import route_layer
from moesim.topology import build_topology
from moesim.traces.store import read_trace
from moesim.traces.synthetic import synthesize

__all__ = ["run_a2a"]


def run_a2a(
    *,
    hardware: str,
    ep: int,
    tokens_per_rank: int,
    hidden: int,
    topk: int,
    num_experts: int,
    dispatcher: str = "auto",
    dispatch_dtype: Wire | None = None,
    combine_dtype: Wire | None = None,
    dedup: Dedup | None = None,
    groups: tuple[int, int] | None = None,
    network: Tier = "analytic",
    flow_rel_tol: float = FLOW_REL_TOL,
    seed: int = 0,
    trace: Path | None = None,
) -> dict[str, Any]:
    """Time one dispatch and one combine; returns a JSON-ready dict of times and bytes.

    ``dispatch_dtype``, ``combine_dtype``, ``dedup``: None takes the dispatcher's.
    ``groups``: (expert groups, groups per token) of a group-limited router, or None.
    """
    hw = get_profile(hardware)
    disp = DispatcherChoice(
        preset=dispatcher, dedup=dedup, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype
    ).resolve(hw)
    for name, value in (
        ("ep", ep),
        ("tokens-per-rank", tokens_per_rank),
        ("hidden", hidden),
        ("top-k", topk),
        ("num-experts", num_experts),
    ):
        if value < 1:
            raise InputError("must be at least 1", field=name, value=value)
    if not 0 <= flow_rel_tol <= 0.2:
        raise InputError("must be in [0, 0.2]", field="flow-rel-tol", value=flow_rel_tol)
    if topk > num_experts:
        raise InputError("top-k exceeds the number of experts", field="top-k", value=topk)
    per_node = min(ep, hw.devices_per_node)
    if ep % per_node:
        raise InputError(
            f"EP must be a multiple of {per_node} devices per node", field="ep", value=ep
        )
    n_tok = ep * tokens_per_rank
    if trace is None:
        ids = synthesize(
            num_experts=num_experts,
            top_k=topk,
            num_layers=1,
            num_tokens=n_tok,
            seed=seed,
            groups=groups,
        ).expert_ids[0]
    else:
        routed = read_trace(trace)
        if routed.num_experts != num_experts or routed.top_k != topk:
            raise InputError(
                f"trace routes top-{routed.top_k} of {routed.num_experts} experts",
                file=trace,
                field="num_experts",
                value=routed.num_experts,
            )
        ids = routed.expert_ids[0][np.arange(n_tok) % routed.num_tokens]
    placement = contiguous(num_experts, ep, 1)
    table, count = placement.replicas(0)
    layer = route_layer(
        ids,
        np.arange(n_tok) // tokens_per_rank,
        placement.slots[0],
        table,
        count,
        num_experts=num_experts,
        devices_per_node=per_node,
        dedup=disp.dedup,
    )
    copies = layer.copies
    assert copies is not None
    topo = build_topology(hw, ep, per_node)
    out: dict[str, Any] = {
        "hardware": hw.name,
        "ep": ep,
        "devices_per_node": per_node,
        "tokens_per_rank": tokens_per_rank,
        "hidden": hidden,
        "top_k": topk,
        "num_experts": num_experts,
        "dispatcher": disp.name,
        "dispatch_dtype": disp.dispatch_dtype,
        "combine_dtype": disp.combine_dtype,
        "dedup": disp.dedup,
        "groups": list(groups) if groups else None,
        "network": network,
        "flow_rel_tol": flow_rel_tol if network == "flow" else None,
        "seed": seed,
    }
    node = np.arange(ep) // per_node
    cross = node[:, None] != node[None, :]
    offdiag = ~np.eye(ep, dtype=bool)
    fixed = None
    for phase, matrix, dtype in (
        ("dispatch", copies, disp.dispatch_dtype),
        ("combine", copies.T, disp.combine_dtype),
    ):
        nbytes = matrix * bytes_per_assignment(hidden, dtype)
        res = exchange_times(nbytes, topo, hw, network, rel_tol=flow_rel_tol)
        if fixed is None:  # launches and round trips of the longest path (analytic tier's)
            lat = (res if network == "analytic" else exchange_times(nbytes, topo, hw)).latency_us
            assert lat is not None
            moved = bool(nbytes[offdiag].any())
            fixed = disp.fixed_us(hw, float(lat.max(initial=0.0)), bool(nbytes[cross].any()))
            fixed = fixed if moved else 0.0  # nothing to send: no call
            out["fixed_us"] = fixed
        t = float(res.time_us.max()) + fixed
        scale_out = float(nbytes[cross].sum())
        scale_up = float(nbytes[offdiag & ~cross].sum())
        busiest = int(np.argmax(res.time_us))
        out[f"{phase}_us"] = t
        out[f"{phase}_bytes"] = float(nbytes[offdiag].sum())
        out[f"{phase}_scale_up_bytes"] = scale_up
        out[f"{phase}_scale_out_bytes"] = scale_out
        out[f"{phase}_copies"] = int(matrix[offdiag].sum())
        # achieved bandwidth per fabric tier, of the busiest device (GB/s = bytes/us / 1e3)
        up_d = (nbytes * (offdiag & ~cross)).sum(axis=1)[busiest]
        out_d = (nbytes * cross).sum(axis=1)[busiest]
        out[f"{phase}_scale_up_gbps"] = float(up_d / t / 1e3) if t else 0.0
        out[f"{phase}_scale_out_gbps"] = float(out_d / t / 1e3) if t else 0.0
    return out
