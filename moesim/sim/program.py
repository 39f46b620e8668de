"""Turn a model, a cluster and routed layers into the engine's per-device program.

Forward MoE layer, per device::

    attention → router + permute → dispatch (all-to-all) → shared experts
    → routed experts → combine (all-to-all) → unpermute

Training adds the backward pass in reverse layer order (combine-backward all-to-all,
expert backward at 2× the forward time, dispatch-backward all-to-all, router and
attention backward at 2×), and the all-reduce of dense (non-expert) gradients in
buckets, each on a stream of its own as soon as the backward pass has filled it
(:func:`gradient_allreduce`).
Prefill and decode run the forward pass only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from moesim.costs.model import CostModel
from moesim.costs.roofline import (
    LayerCosts,
    bytes_per_assignment,
    gemm_time_us,
    permute_us,
)
from moesim.costs.work import BenchShape
from moesim.dispatchers import Dispatcher
from moesim.hardware import HardwareProfile
from moesim.model.shapes import ModelShape
from moesim.sim.allreduce import gradient_allreduce
from moesim.sim.cluster import ClusterSpec
from moesim.sim.engine import Compute, Exchange, Op
from moesim.sim.exchange import ExchangeTimes, exchange_times
from moesim.sim.routing import LayerRouting
from moesim.sim.transfers import FlowSet

__all__ = [
    "BACKWARD_FACTOR",
    "apply_sm_share",
    "apply_stragglers",
    "build_program",
    "interleave_microbatches",
]

BACKWARD_FACTOR = 2.0  # backward costs ~2x forward (gradients w.r.t. inputs and weights)


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
    overlaps another's compute. The gradient all-reduce buckets (training) run once, each
    after every microbatch has done the op that fills it (gradients accumulate over the
    microbatches).
    """
    tails: list[Op] = []
    chains = []
    for m, prog in enumerate(programs):
        body = list(prog)
        while body and body[-1].category == "allreduce":
            op = body.pop()
            if m == 0:
                tails.insert(0, op)
        chains.append(body)
    merged: list[Op] = []
    last: list[int | None] = [None] * len(chains)
    where: list[dict[int, int]] = [{} for _ in chains]  # per microbatch: position -> index
    for pos in range(max(len(c) for c in chains)):
        for m, chain in enumerate(chains):
            if pos >= len(chain):
                continue
            prev = last[m]
            op = chain[pos]
            op = replace(
                op,
                name=f"mb{m} {op.name}",
                after=() if prev is None else (prev,),
                microbatch=m,
                stream="comm" if isinstance(op, Exchange) else "compute",
            )
            last[m] = where[m][pos] = len(merged)
            merged.append(op)
    for op in tails:
        assert op.after is not None
        after = tuple(sorted(w[j] for j in op.after for w in where if j in w))
        merged.append(replace(op, after=after))
    return merged


#: the all-to-alls that travel the combine's way (expert to token owner)
_COMBINE_WAY = frozenset({"combine", "dispatch bwd"})


def _plus_fixed(t: ExchangeTimes, fixed_us: float) -> ExchangeTimes:
    """``t`` with a fixed cost added to the time of every device that sends or receives."""
    if not fixed_us:
        return t
    active = t.sent_bytes + t.recv_bytes > 0
    assert t.latency_us is not None
    return ExchangeTimes(
        np.where(active, t.time_us + fixed_us, 0.0),
        t.sent_bytes,
        t.recv_bytes,
        t.events,
        t.port_us,
        t.latency_us + fixed_us,
    )


def apply_sm_share(program: list[Op], slowdown: float) -> list[Op]:
    """The program with every GEMM-bound compute op (all but the memory-bound permutes)
    ``slowdown`` times as long: the SMs a dispatcher holds while it overlaps compute
    (:func:`moesim.dispatchers.compute_slowdown`)."""
    if slowdown == 1.0:
        return program
    return [
        replace(op, duration_us=op.duration_us * slowdown)
        if isinstance(op, Compute) and "permute" not in op.phase
        else op
        for op in program
    ]


def _full(d: int, value: float) -> np.ndarray:
    return np.full(d, float(value))


@dataclass(frozen=True)
class _MoeLayer:
    """One MoE layer before its compute times: ``sent_assign`` (D,) assignments leaving
    each device (what its permute moves), ``expert_tokens`` (D, S) tokens per hosted
    expert slot, and ``ops(permute_us, experts_us)`` its forward and backward ops."""

    sent_assign: np.ndarray
    expert_tokens: np.ndarray
    ops: Callable[[np.ndarray, np.ndarray], tuple[list[Op], list[Op]]]


def _compute_times(
    layers: list[_MoeLayer], shape: ModelShape, hw: HardwareProfile, dtype: str, model: CostModel
) -> tuple[np.ndarray, np.ndarray]:
    """(L, D) permute and grouped-expert times of every MoE layer, one call of each."""
    if not layers:
        return np.zeros((0, 0)), np.zeros((0, 0))
    sent = np.stack([x.sent_assign for x in layers])  # (L, D)
    tokens = np.stack([x.expert_tokens for x in layers])  # (L, D, S)
    permute = permute_us(sent, shape.d_model, hw, dtype)
    bench_shape = BenchShape.from_model(shape, local_experts=tokens.shape[2])
    experts = model.grouped_ffn_us(tokens.reshape(-1, tokens.shape[2]), bench_shape, dtype)
    return permute, experts.reshape(tokens.shape[:2])


def _moe_ops(
    layer: int,
    routed: LayerRouting,
    shape: ModelShape,
    hw: HardwareProfile,
    cluster: ClusterSpec,
    costs: LayerCosts,
    tokens_per_device: int,
    dtype: str,
    dispatcher: Dispatcher,
    training: bool,
) -> _MoeLayer:
    """One MoE layer: what its routing decides of its ops (its all-to-alls), and the loads
    its permute and expert times follow from; its ``ops`` make its forward and
    backward ops once those times are known."""
    d, dm = cluster.num_devices, shape.d_model
    assert routed.dispatch is not None and routed.copies is not None, "routing was compacted"
    sent_assign = routed.dispatch.sum(axis=1)  # (D,) assignments leaving each token owner
    # bytes of one copy in each all-to-all the pass runs (forward: dispatch and combine;
    # training: the four), by the dispatcher's dtypes
    wire = {
        k: bytes_per_assignment(dm, v)
        for k, v in dispatcher.pass_dtypes().items()
        if training or k in ("dispatch", "combine")
    }
    copies = routed.copies
    # closed form (the analytic tier's times; the flow tier's port-limited figures): the
    # other exchanges are the same traffic rescaled and, for the combine's way, reversed
    b_disp = wire["dispatch"]
    disp = exchange_times(copies, cluster.topology, hw, "analytic", scale=b_disp)
    # the dispatcher's fixed cost per call: launches, and round trips of the longest path
    assert disp.latency_us is not None  # the analytic tier's
    across = False  # any copy between scale-up domains
    if d > cluster.domain_size:
        dom = np.arange(d) // cluster.domain_size
        across = bool(np.any(copies[dom[:, None] != dom[None, :]]))
    fixed = dispatcher.fixed_us(hw, float(disp.latency_us.max(initial=0.0)), across)
    times = {
        name: _plus_fixed(disp.scaled(wire[name] / b_disp, reverse=name in _COMBINE_WAY), fixed)
        for name in wire
    }
    flows: dict[str, FlowSet | None] = dict.fromkeys(wire)
    if cluster.network == "flow":  # timed in the engine's loop, on the fabric
        base = cluster.flows(copies)
        back = base.reversed(1.0) if base.bundles is None else cluster.flows(copies.T, combine=True)
        flows = {
            name: replace(
                (back if name in _COMBINE_WAY else base).rescaled(wire[name]),
                extra_latency_us=fixed,
            )
            for name in wire
        }

    def exchange(name: str, cat: str, senders: np.ndarray | None, pass_: str = "forward"
                 ) -> Exchange:  # fmt: skip
        fs, t = flows[name], times[name]
        return Exchange(
            f"L{layer} {name}",
            cat,
            np.zeros(d) if fs is not None else t.time_us,
            senders,
            t.sent_bytes,
            t.recv_bytes,
            layer,
            pass_,
            flows=fs,
            port_limited_us=t.time_us if fs is not None else None,
            phase=name,
        )

    # [s, d]: d receives token copies from s; None when every device hears from every other
    off_diag_zeros = d * d - np.count_nonzero(copies) - int((np.diagonal(copies) == 0).sum())
    needs_disp = None
    if off_diag_zeros:
        needs_disp = copies > 0
        np.fill_diagonal(needs_disp, True)
    needs_comb = None if needs_disp is None else needs_disp.T

    def ops(permute: np.ndarray, experts: np.ndarray) -> tuple[list[Op], list[Op]]:
        return _layer_ops(
            layer, exchange, needs_disp, needs_comb, permute, experts, hw, costs, training
        )

    return _MoeLayer(sent_assign, routed.expert_tokens, ops)


def _layer_ops(
    layer: int,
    exchange: Callable[..., Exchange],
    needs_disp: np.ndarray | None,
    needs_comb: np.ndarray | None,
    permute: np.ndarray,
    experts: np.ndarray,
    hw: HardwareProfile,
    costs: LayerCosts,
    training: bool,
) -> tuple[list[Op], list[Op]]:
    """Forward and backward ops of one MoE layer, given its all-to-alls (``exchange``), the
    senders each device needs, and its (D,) permute and expert times."""
    d = permute.size
    unpermute = permute.copy()
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
        exchange("dispatch", "dispatch", needs_disp),
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
        exchange("combine", "combine", needs_comb),
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
            exchange("combine bwd", "combine", needs_disp, "backward"),
            Compute(
                f"L{layer} experts bwd",
                "expert",
                (hw.efficiency.expert_backward or k) * experts,
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
            exchange("dispatch bwd", "dispatch", needs_comb, "backward"),
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
    dispatcher: Dispatcher,
    model: CostModel,
) -> list[Op]:
    """The ops of one step, in the order every device runs them.

    Args:
        routed_layers: routing of each MoE layer, keyed by model layer index.
        costs: per-device times of the non-expert parts of a layer (from ``layer_costs``).
        model: the device's cost model (the experts' grouped GEMMs), the one ``costs``
            came from.
    """
    d = cluster.num_devices
    training = mode == "training"
    k = BACKWARD_FACTOR
    forward: list[Op] = []
    backward: list[list[Op]] = []  # per layer, in backward order
    moe = set(routed_layers)
    # each MoE layer's routing, in layer order (a streamed routing keeps one layer's
    # traffic matrices at a time); then every MoE layer's permute and expert times in one
    # call each: both are per device, element by element, so the same values
    pending = {
        layer: _moe_ops(
            layer,
            routed_layers[layer],
            shape,
            hw,
            cluster,
            costs,
            tokens_per_device,
            dtype,
            dispatcher,
            training,
        )
        for layer in range(shape.num_layers)
        if layer in routed_layers
    }
    permute, experts = _compute_times(list(pending.values()), shape, hw, dtype, model)
    index = {layer: li for li, layer in enumerate(pending)}
    for layer in range(shape.num_layers):
        if layer in pending:
            li = index[layer]
            f, bw = pending[layer].ops(permute[li], experts[li])
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
            backward.insert(0, bw)
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
    if not training:
        return program
    program.append(Compute("lm head bwd", "other", _full(d, k * head), pass_="backward"))
    # dense gradients, in the order the backward pass finishes them: (op index, bytes)
    ready: list[tuple[int, float]] = []
    head_params = 0 if shape.tie_embeddings else shape.vocab_size * shape.d_model
    ready.append((len(program) - 1, float(head_params)))
    for bw in backward:
        program += bw
        ready.append((len(program) - 1, float(shape.dense_params_per_layer(bw[0].layer in moe))))
    dense_params = (
        shape.total_params() - shape.num_moe_layers * shape.num_experts * shape.expert_params()
    )
    # embeddings, final norms (and any stack this walk does not list): done last
    rest = dense_params - sum(b for _, b in ready)
    ready.append((len(program) - 1, float(max(rest, 0))))
    buckets = gradient_allreduce(ready, hw, cluster)
    if buckets:  # the step's ops on one stream, the buckets' all-reduces on another
        program = [replace(op, stream="main") for op in program]
    return program + buckets
