"""Turn a model, a cluster and routed layers into the engine's per-device program.

Forward MoE layer, per device::

    attention → router + permute → dispatch (all-to-all) → shared experts
    → routed experts → combine (all-to-all) → unpermute

Training adds the backward pass in reverse layer order (combine-backward all-to-all,
expert backward at 2× the forward time, dispatch-backward all-to-all, router and
attention backward at 2×), then the all-reduce of dense (non-expert) gradients.
Prefill and decode run the forward pass only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from moesim.costs.model import cost_model_for
from moesim.costs.roofline import (
    BYTES_PER_ELEMENT,
    LayerCosts,
    bytes_per_assignment,
    gemm_time_us,
    memory_time_us,
)
from moesim.hardware import HardwareProfile
from moesim.kernels.bench import BenchShape
from moesim.model.shapes import ModelShape
from moesim.sim.engine import Compute, Exchange, Op
from moesim.sim.exchange import Tier, exchange_times
from moesim.sim.flows import FLOW_REL_TOL
from moesim.sim.routing import LayerRouting
from moesim.topology.build import Topology

__all__ = [
    "BACKWARD_FACTOR",
    "ClusterSpec",
    "allreduce_time_us",
    "apply_stragglers",
    "build_program",
    "interleave_microbatches",
]

BACKWARD_FACTOR = 2.0  # backward costs ~2x forward (gradients w.r.t. inputs and weights)


@dataclass(frozen=True)
class ClusterSpec:
    """The simulated cluster: its devices, topology and how exchanges are timed."""

    num_devices: int
    devices_per_node: int
    topology: Topology
    network: Tier = "analytic"
    flow_rel_tol: float = FLOW_REL_TOL  # the flow tier's tolerance (0: exact)

    @property
    def domain_size(self) -> int:
        """Devices sharing one scale-up fabric."""
        return self.topology.domain_size


def allreduce_time_us(nbytes: float, hw: HardwareProfile, cluster: ClusterSpec) -> float:
    """Ring all-reduce: ``2 (D-1)/D * bytes`` over the slowest tier, plus 2 (D-1) latencies."""
    d = cluster.num_devices
    if d == 1 or nbytes == 0:
        return 0.0
    if cluster.domain_size >= d:
        bw, lat = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up, hw.scale_up.latency_us
    else:
        bw, lat = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out, hw.scale_out.latency_us
    return 2 * (d - 1) / d * nbytes / (bw * 1e3) + 2 * (d - 1) * lat


def apply_stragglers(
    program: list[Op], slowdown: np.ndarray, jitter: float, rng: np.random.Generator
) -> list[Op]:
    """The program with every compute op of device ``d`` taking ``slowdown[d]`` times as
    long, times seeded log-normal noise of relative spread ``jitter`` (mean 1) per op and
    device. Transfers are untouched."""
    out: list[Op] = []
    d = slowdown.size
    for op in program:
        if isinstance(op, Compute):
            factor = slowdown
            if jitter > 0:
                factor = factor * rng.lognormal(-(jitter**2) / 2, jitter, size=d)
            op = replace(op, duration_us=op.duration_us * factor)
        out.append(op)
    return out


def interleave_microbatches(programs: list[list[Op]]) -> list[Op]:
    """Merge per-microbatch programs for two-stream overlap (see :mod:`moesim.sim.engine`).

    Ops are taken position by position (mb0's first op, mb1's first op, mb0's second, ...);
    each depends on the previous op of its own microbatch, so one microbatch's transfer
    overlaps another's compute. A final all-reduce (training) runs once, after every
    microbatch is done.
    """
    tails: list[Op] = []
    chains = []
    for prog in programs:
        body = list(prog)
        if body and body[-1].category == "allreduce":
            tails = [body.pop()]
        chains.append(body)
    merged: list[Op] = []
    last: list[int | None] = [None] * len(chains)
    for pos in range(max(len(c) for c in chains)):
        for m, chain in enumerate(chains):
            if pos >= len(chain):
                continue
            prev = last[m]
            op = replace(
                chain[pos],
                name=f"mb{m} {chain[pos].name}",
                after=() if prev is None else (prev,),
                microbatch=m,
            )
            last[m] = len(merged)
            merged.append(op)
    for op in tails:
        merged.append(replace(op, after=tuple(i for i in last if i is not None)))
    return merged


def _full(d: int, value: float) -> np.ndarray:
    return np.full(d, float(value))


def _moe_ops(
    layer: int,
    routed: LayerRouting,
    shape: ModelShape,
    hw: HardwareProfile,
    cluster: ClusterSpec,
    costs: LayerCosts,
    tokens_per_device: int,
    dtype: str,
    dispatch_dtype: str,
    training: bool,
) -> tuple[list[Op], list[Op]]:
    """Forward and backward ops of one MoE layer."""
    d, dm = cluster.num_devices, shape.d_model
    b = BYTES_PER_ELEMENT[dtype]
    launch = hw.kernel_launch_us
    assert routed.dispatch is not None and routed.copies is not None, "routing was compacted"
    sent_assign = routed.dispatch.sum(axis=1)  # (D,) assignments leaving each token owner
    permute = np.asarray(memory_time_us(2.0 * sent_assign * dm * b, hw)) + launch
    unpermute = permute.copy()
    bench_shape = BenchShape.from_model(shape, local_experts=routed.expert_tokens.shape[1])
    experts = cost_model_for(hw).grouped_ffn_us(routed.expert_tokens, bench_shape, dtype)
    b_disp, b_comb = bytes_per_assignment(dm, dispatch_dtype), bytes_per_assignment(dm, "bf16")
    topo, tier = cluster.topology, cluster.network
    copies = routed.copies
    tol = cluster.flow_rel_tol
    disp = exchange_times(copies, topo, hw, tier, scale=b_disp, rel_tol=tol)
    # the other exchanges are the same traffic rescaled (exact in both tiers) and, for the
    # combine, reversed (the flow tier simulates that one: reverse paths may differ)
    gdisp = disp.scaled(b_comb / b_disp)
    ports: dict[str, np.ndarray | None] = {"disp": None, "comb": None, "gdisp": None}
    if tier == "analytic":
        comb = disp.scaled(b_comb / b_disp, reverse=True)
    else:
        comb = exchange_times(copies.T, topo, hw, tier, scale=b_comb, rel_tol=tol)
        # what each device's own ports allow: a flow time above it shows a slow NIC or link
        alone = exchange_times(copies, topo, hw, "analytic", scale=b_disp)
        ports = {
            "disp": alone.time_us,
            "comb": alone.scaled(b_comb / b_disp, reverse=True).time_us,
            "gdisp": alone.scaled(b_comb / b_disp).time_us,
        }
    # [s, d]: d receives token copies from s; None when every device hears from every other
    off_diag_zeros = d * d - np.count_nonzero(copies) - int((np.diagonal(copies) == 0).sum())
    needs_disp = None
    if off_diag_zeros:
        needs_disp = copies > 0
        np.fill_diagonal(needs_disp, True)
    needs_comb = None if needs_disp is None else needs_disp.T
    fwd: list[Op] = [
        Compute(
            f"L{layer} attention", "other", _full(d, costs.attention_us), layer, phase="attention"
        ),
        Compute(
            f"L{layer} router+permute",
            "other",
            costs.router_us + permute,
            layer,
            phase="router+permute",
        ),
        Exchange(
            f"L{layer} dispatch",
            "dispatch",
            disp.time_us,
            needs_disp,
            disp.sent_bytes,
            disp.recv_bytes,
            layer,
            flow_events=disp.events,
            port_limited_us=ports["disp"],
            phase="dispatch",
        ),
    ]
    if costs.shared_us:
        fwd.append(
            Compute(
                f"L{layer} shared experts",
                "other",
                _full(d, costs.shared_us),
                layer,
                phase="shared experts",
            )
        )
    fwd += [
        Compute(f"L{layer} experts", "expert", experts, layer, phase="experts"),
        Exchange(
            f"L{layer} combine",
            "combine",
            comb.time_us,
            needs_comb,
            comb.sent_bytes,
            comb.recv_bytes,
            layer,
            flow_events=comb.events,
            port_limited_us=ports["comb"],
            phase="combine",
        ),
        Compute(f"L{layer} unpermute", "other", unpermute, layer, phase="unpermute"),
    ]
    bwd: list[Op] = []
    if training:
        k = BACKWARD_FACTOR
        bwd = [
            Compute(
                f"L{layer} unpermute bwd",
                "other",
                unpermute,
                layer,
                "backward",
                phase="unpermute bwd",
            ),
            Exchange(
                f"L{layer} combine bwd",
                "combine",
                gdisp.time_us,
                needs_disp,
                gdisp.sent_bytes,
                gdisp.recv_bytes,
                layer,
                "backward",
                port_limited_us=ports["gdisp"],
                phase="combine bwd",
            ),
            Compute(
                f"L{layer} experts bwd",
                "expert",
                k * experts,
                layer,
                "backward",
                phase="experts bwd",
            ),
        ]
        if costs.shared_us:
            bwd.append(
                Compute(
                    f"L{layer} shared experts bwd",
                    "other",
                    _full(d, k * costs.shared_us),
                    layer,
                    "backward",
                    phase="shared experts bwd",
                )
            )
        bwd += [
            Exchange(
                f"L{layer} dispatch bwd",
                "dispatch",
                comb.time_us,
                needs_comb,
                comb.sent_bytes,
                comb.recv_bytes,
                layer,
                "backward",
                port_limited_us=ports["comb"],
                phase="dispatch bwd",
            ),
            Compute(
                f"L{layer} router+permute bwd",
                "other",
                k * costs.router_us + permute,
                layer,
                "backward",
                phase="router+permute bwd",
            ),
            Compute(
                f"L{layer} attention bwd",
                "other",
                _full(d, k * costs.attention_us),
                layer,
                "backward",
                phase="attention bwd",
            ),
        ]
    return fwd, bwd


def build_program(
    shape: ModelShape,
    hw: HardwareProfile,
    cluster: ClusterSpec,
    routed_layers: Mapping[int, LayerRouting],
    costs: LayerCosts,
    *,
    mode: str,
    tokens_per_device: int,
    sequence_length: int,
    dtype: str,
    dispatch_dtype: str,
) -> list[Op]:
    """The ops of one step, in the order every device runs them.

    Args:
        routed_layers: routing of each MoE layer, keyed by model layer index.
        costs: per-device times of the non-expert parts of a layer (from ``layer_costs``).
    """
    d = cluster.num_devices
    training = mode == "training"
    k = BACKWARD_FACTOR
    forward: list[Op] = []
    backward: list[Op] = []
    for layer in range(shape.num_layers):
        if layer in routed_layers:
            f, bw = _moe_ops(
                layer,
                routed_layers[layer],
                shape,
                hw,
                cluster,
                costs,
                tokens_per_device,
                dtype,
                dispatch_dtype,
                training,
            )
        else:
            t = costs.attention_us + costs.dense_ffn_us
            f = [Compute(f"L{layer} dense", "other", _full(d, t), layer, phase="dense")]
            bw = [
                Compute(
                    f"L{layer} dense bwd",
                    "other",
                    _full(d, k * t),
                    layer,
                    "backward",
                    phase="dense bwd",
                )
            ]
        forward += f
        if training:
            backward = bw + backward
    # output head: every token in training/decode, one token per sequence in prefill
    head_tokens = (
        tokens_per_device if mode != "prefill" else max(1, tokens_per_device // sequence_length)
    )
    head = (
        float(gemm_time_us(head_tokens, shape.vocab_size, shape.d_model, hw, dtype))
        + hw.kernel_launch_us
    )
    forward.append(Compute("lm head", "other", _full(d, head)))
    program = forward
    if training:
        program += [
            Compute("lm head bwd", "other", _full(d, k * head), pass_="backward"),
            *backward,
        ]
        dense_grad_bytes = (
            shape.total_params() - shape.num_moe_layers * shape.num_experts * shape.expert_params()
        ) * BYTES_PER_ELEMENT["bf16"]
        ar = allreduce_time_us(dense_grad_bytes, hw, cluster)
        program.append(
            Exchange(
                "dense-gradient all-reduce",
                "allreduce",
                _full(d, ar),
                None,
                pass_="backward",
            )
        )
    return program
