"""Compute times of a layer's non-expert parts, on the hardware profile's roofline.

Every time here is the cost model's roofline (:func:`moesim.costs.model.predict_us`) with
the profile's factors (:func:`~moesim.costs.model.profile_factors`: peak × gemm
efficiency, HBM × hbm efficiency): a smooth maximum of compute and memory time,
``(compute**4 + memory**4) ** (1/4)``, the rule the routed experts are timed by where the
device has no measured tables. The functions here leave the launch overhead out;
:func:`layer_costs` adds one per kernel. A GEMM with few tokens is bound by its weight
reads.

Units: TFLOP/s = 1e6 FLOP/µs; GB/s = 1e3 bytes/µs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moesim.costs.model import CostModel, predict_us, profile_factors
from moesim.costs.work import BYTES_PER_ELEMENT, BenchShape
from moesim.hardware import HardwareProfile
from moesim.model.shapes import ModelShape

__all__ = [
    "LayerCosts",
    "bytes_per_assignment",
    "expert_ffn_time_us",
    "gemm_time_us",
    "layer_costs",
    "memory_time_us",
    "permute_us",
]


def _profile_us(
    flops: np.ndarray | float,
    nbytes: np.ndarray | float,
    hw: HardwareProfile,
    dtype: str,
    rows: np.ndarray | float | None = None,
    width: float | None = None,
    efficiency: float | None = None,
) -> np.ndarray:
    """Time of work of ``flops`` and ``nbytes`` (arrays broadcast) on the profile's
    roofline, without launch overhead: :func:`~moesim.costs.model.predict_us` of the
    profile's factors, launch set to 0. ``rows`` and ``width``: a GEMM's rows and output
    elements per row, for its small-batch term (None: none); ``efficiency``: the fraction
    of the peak instead of the GEMMs' (and no small-batch term)."""
    f = replace(profile_factors(hw, dtype, width if rows is not None else None), launch_us=0.0)
    if efficiency is not None:
        f = replace(f, peak_flop_per_us=hw.peak_tflops(dtype) * efficiency * 1e6, half_tokens=0.0)
    r = np.asarray(1.0 if rows is None else rows, dtype=np.float64)
    return predict_us(f, np.asarray(flops), np.asarray(nbytes), r)


def memory_time_us(nbytes: np.ndarray | float, hw: HardwareProfile) -> np.ndarray:
    """Time to stream ``nbytes`` through HBM once (no arithmetic, so the dtype's peak does
    not enter: bf16's is taken)."""
    return _profile_us(0.0, nbytes, hw, "bf16")


def gemm_time_us(
    m: np.ndarray | float, n: float, k: float, hw: HardwareProfile, dtype: str
) -> np.ndarray:
    """(m, k) @ (k, n): roofline time without launch overhead, the small-batch term of
    ``m x n`` outputs included (:mod:`moesim.costs.fit`). ``m`` may be an array."""
    b = BYTES_PER_ELEMENT[dtype]
    flops = 2.0 * m * n * k
    nbytes = b * (m * k + k * n + m * n)
    return _profile_us(flops, nbytes, hw, dtype, rows=m, width=n)


def permute_us(
    copies: np.ndarray | float, d_model: int, hw: HardwareProfile, dtype: str
) -> np.ndarray:
    """Time of a permute (or unpermute) of ``copies`` token copies of ``d_model`` elements:
    each read and written once through HBM, plus one launch (memory-bound)."""
    b = BYTES_PER_ELEMENT[dtype]
    return np.asarray(memory_time_us(2.0 * np.asarray(copies) * d_model * b, hw)) + (
        hw.kernel_launch_us
    )


def expert_ffn_time_us(
    tokens: np.ndarray, d_model: int, d_ff: int, matrices: int, hw: HardwareProfile, dtype: str
) -> np.ndarray:
    """Time of one expert FFN per entry of ``tokens`` (0 tokens → 0 µs, the GEMM is skipped).

    A gated FFN (3 matrices) runs two (T, d_model)x(d_model, d_ff) GEMMs and one
    (T, d_ff)x(d_ff, d_model); an ungated one (2 matrices) one of each.
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    up = gemm_time_us(tokens, d_ff, d_model, hw, dtype)
    down = gemm_time_us(tokens, d_model, d_ff, hw, dtype)
    t = (matrices - 1) * up + down
    return np.where(tokens > 0, t, 0.0)


@dataclass(frozen=True)
class LayerCosts:
    """Per-device compute times of one layer's phases, forward pass, in µs.

    ``attention_us`` covers the norms, attention projections and scores (and, in a dense
    layer, the dense FFN); ``router_us`` the router GEMM and top-k; ``shared_us`` the
    shared experts.
    """

    attention_us: float
    router_us: float
    shared_us: float
    dense_ffn_us: float
    scores_us: float = 0.0  # the attention scores' part of attention_us, on the roofline


def layer_costs(
    shape: ModelShape,
    hw: HardwareProfile,
    *,
    tokens: int,
    sequence_length: int,
    mode: str,
    dtype: str,
    model: CostModel | None = None,
) -> LayerCosts:
    """Times of the non-expert parts of one layer on one device holding ``tokens``.

    Attention scores are causal over ``sequence_length`` in training/prefill; in decode,
    each token reads the KV cache of ``sequence_length`` previous tokens. Roofline times
    of the profile, except where ``model`` (the device's cost model) has a measured table:
    then the router, the shared experts, the dense FFN and (training/prefill) the
    attention block come from it (see :func:`_measured_parts`); norms and decode attention
    (a KV-cache read the kernel benchmarks do not measure) stay on the roofline.
    """
    d = shape.d_model
    launch = hw.kernel_launch_us
    b = BYTES_PER_ELEMENT[dtype]
    a = shape.attention
    heads = a.num_heads
    qk_dim = (
        (a.qk_nope_head_dim or 0) + (a.qk_rope_head_dim or 0) if a.kind == "mla" else shape.head_dim
    )
    v_dim = a.v_head_dim if a.kind == "mla" and a.v_head_dim else shape.head_dim
    proj = float(gemm_time_us(tokens, shape.attention_params() / d, d, hw, dtype))
    # attention runs in bf16 whatever the GEMMs' dtype (DeepSeek-V3 report, arXiv
    # 2412.19437 sec. 3.3: attention operators keep their original precision under FP8)
    attn_eff = hw.efficiency.attention or hw.efficiency.gemm
    if mode == "decode":
        kv_heads = a.num_kv_heads or heads
        kv_bytes_per_token = (
            b * ((a.kv_lora_rank or 0) + (a.qk_rope_head_dim or 0))
            if a.kind == "mla"
            else b * 2 * kv_heads * shape.head_dim
        )
        kv_bytes = tokens * sequence_length * kv_bytes_per_token
        flops = 2.0 * tokens * sequence_length * heads * (qk_dim + v_dim)
        scores = float(_profile_us(flops, kv_bytes, hw, "bf16", efficiency=attn_eff))
    else:
        flops = 2.0 * tokens * (sequence_length / 2) * heads * (qk_dim + v_dim)
        scores = float(_profile_us(flops, 0.0, hw, "bf16", efficiency=attn_eff))
    norms = float(memory_time_us(2 * 2 * tokens * d * b, hw))
    attention = proj + scores + norms + 4 * launch
    router = float(gemm_time_us(tokens, shape.num_experts, d, hw, "bf16")) + 2 * launch
    shared = 0.0
    if shape.num_shared_experts:
        d_ff = (shape.shared_expert_d_ff or shape.expert_d_ff) * shape.num_shared_experts
        shared = float(
            expert_ffn_time_us(np.array([tokens]), d, d_ff, shape.ffn_matrices, hw, dtype)[0]
        )
        shared += shape.ffn_matrices * launch
    dense_ffn = 0.0
    if shape.dense_d_ff:
        dense_ffn = float(
            expert_ffn_time_us(
                np.array([tokens]), d, shape.dense_d_ff, shape.ffn_matrices, hw, dtype
            )[0]
        )
        dense_ffn += shape.ffn_matrices * launch
    costs = LayerCosts(
        attention_us=attention,
        router_us=router,
        shared_us=shared,
        dense_ffn_us=dense_ffn,
        scores_us=scores,
    )
    if model is None or model.table is None:
        return costs
    return _measured_parts(
        costs,
        model,
        shape,
        tokens=tokens,
        sequence_length=sequence_length,
        mode=mode,
        dtype=dtype,
        norms_us=norms,
    )


def _measured_parts(
    costs: LayerCosts,
    model: CostModel,
    shape: ModelShape,
    *,
    tokens: int,
    sequence_length: int,
    mode: str,
    dtype: str,
    norms_us: float,
) -> LayerCosts:
    """``costs`` with the parts the kernel benchmarks measure taken from ``model``.

    router: the ``router`` op at ``tokens`` (bf16, as the roofline times it); attention
    (training/prefill): ``tokens / sequence_length`` sequences, each one ``attention`` call
    over ``sequence_length`` tokens (batch 1, causal: what the benchmark runs), plus the
    roofline's norms; shared experts and dense FFN: one ``expert_ffn_loop`` expert of their
    width (SwiGLU only: the benchmark's FFN has three matrices).
    """
    bench = BenchShape.from_model(shape, local_experts=1)
    router = float(model.time_us("router", bench, float(tokens), "bf16")[0])
    attention = costs.attention_us
    if mode != "decode":
        per_seq = float(model.time_us("attention", bench, float(sequence_length), dtype)[0])
        attention = tokens / sequence_length * per_seq + norms_us
    shared, dense_ffn = costs.shared_us, costs.dense_ffn_us
    if shape.ffn_matrices == 3:
        if shape.num_shared_experts:
            width = (shape.shared_expert_d_ff or shape.expert_d_ff) * shape.num_shared_experts
            ffn = replace(bench, d_ff=width)
            shared = float(model.time_us("expert_ffn_loop", ffn, float(tokens), dtype)[0])
        if shape.dense_d_ff:
            ffn = replace(bench, d_ff=shape.dense_d_ff)
            dense_ffn = float(model.time_us("expert_ffn_loop", ffn, float(tokens), dtype)[0])
    return LayerCosts(
        attention_us=attention, router_us=router, shared_us=shared, dense_ffn_us=dense_ffn
    )


def bytes_per_assignment(d_model: int, dtype: str) -> float:
    """Bytes one token copy takes on the wire: its hidden vector, plus for fp8 one fp32
    scale per 128 channels (DeepSeek-V3's fine-grained quantisation)."""
    b = d_model * BYTES_PER_ELEMENT[dtype]
    return b + (d_model / 128) * 4 if dtype == "fp8" else b
