"""The work model of the benchmarked ops, torch-free: the widths of one benchmark series
(:class:`BenchShape`), the flops and bytes of one call of each op (:func:`op_work`) and
the width columns a measured row records (:func:`table_widths`). The benchmark
(:mod:`moesim.kernels.bench`) writes these figures into its tables, and the cost model
(:mod:`moesim.costs.model`) reads them back, so tables and model agree on what an op does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from moesim.model.shapes import ModelShape

__all__ = [
    "BYTES_PER_ELEMENT",
    "FFN_OPS",
    "BenchShape",
    "op_output_width",
    "op_work",
    "op_work_array",
    "table_widths",
]

BYTES_PER_ELEMENT = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}
"""Bytes of one element of each dtype."""

FFN_OPS = ("expert_ffn_loop", "expert_ffn_bmm", "expert_ffn_grouped")
"""The expert FFN ops: the same SwiGLU FFN of ``local_experts`` experts, run three ways."""


@dataclass(frozen=True)
class BenchShape:
    """The widths one benchmark series uses, usually taken from a model preset.

    ``num_experts`` is the model's routed experts (router, permute, unpermute);
    ``local_experts`` the experts one device runs in the expert FFN ops. Attention is
    MHA/GQA unless ``kv_lora_rank`` is set (MLA: ``head_dim`` = nope + rope dims).
    """

    model: str
    d_model: int
    d_ff: int
    num_experts: int
    local_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    router_score: Literal["softmax", "sigmoid"] = "softmax"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0

    @classmethod
    def from_model(cls, shape: ModelShape, local_experts: int) -> BenchShape:
        """The benchmark shape of a model preset, with ``local_experts`` experts per device."""
        a = shape.attention
        if a.kind == "mla":
            head_dim = (a.qk_nope_head_dim or 0) + (a.qk_rope_head_dim or 0)
            v_head_dim = a.v_head_dim or head_dim
            kv_heads = a.num_heads
        else:
            head_dim = v_head_dim = shape.head_dim
            kv_heads = a.num_kv_heads or a.num_heads
        return cls(
            model=shape.name,
            d_model=shape.d_model,
            d_ff=shape.expert_d_ff,
            num_experts=shape.num_experts,
            local_experts=max(1, min(local_experts, shape.num_experts)),
            top_k=shape.top_k,
            num_heads=a.num_heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            v_head_dim=v_head_dim,
            # DeepSeek-V3 scores experts with a sigmoid (and a bias for selection only)
            router_score="sigmoid" if shape.router_bias and a.kind == "mla" else "softmax",
            q_lora_rank=a.q_lora_rank or 0,
            kv_lora_rank=a.kv_lora_rank or 0,
            qk_rope_head_dim=a.qk_rope_head_dim or 0,
        )


def _attention_widths(s: BenchShape) -> tuple[int, int]:
    """(projection weights, projected activation width per token) of the attention block."""
    h, d = s.num_heads, s.d_model
    if s.kv_lora_rank:
        nope = s.head_dim - s.qk_rope_head_dim
        q_w = (
            (d * s.q_lora_rank + s.q_lora_rank * h * s.head_dim)
            if s.q_lora_rank
            else d * h * s.head_dim
        )
        kv_w = d * (s.kv_lora_rank + s.qk_rope_head_dim) + s.kv_lora_rank * h * (
            nope + s.v_head_dim
        )
        weights = q_w + kv_w + h * s.v_head_dim * d
        act = h * (2 * s.head_dim + s.v_head_dim) + s.q_lora_rank + s.kv_lora_rank
        return weights, act
    qkv = (h + s.num_kv_heads) * s.head_dim + s.num_kv_heads * s.v_head_dim
    return d * qkv + h * s.v_head_dim * d, qkv + h * s.v_head_dim


def op_work(op: str, s: BenchShape, tokens: int, dtype: str) -> tuple[float, float, float]:
    """Estimated ``(flops, bytes moved, bytes allocated)`` of one call of ``op``.

    ``flops`` counts multiply-adds as 2; ``bytes`` is what the op must read and write
    at least (weights, inputs, outputs); the allocation estimate decides the memory cap.
    """
    return _op_work(op, s, float(tokens), dtype)


def op_work_array(
    op: str, s: BenchShape, tokens: np.ndarray, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """(flops, bytes moved) of :func:`op_work` for every entry of ``tokens`` at once (the
    same arithmetic, element by element, so the same values)."""
    t = np.asarray(tokens, dtype=np.float64)
    flops, moved, _ = _op_work(op, s, t, dtype)
    return np.broadcast_to(flops, t.shape).astype(np.float64), np.broadcast_to(moved, t.shape)


def _op_work(op: str, s: BenchShape, t: Any, dtype: str) -> tuple[Any, Any, Any]:
    """:func:`op_work` for a float or an array of token counts (polynomials in ``t``)."""
    e = BYTES_PER_ELEMENT[dtype]
    d, f, k = float(s.d_model), float(s.d_ff), float(s.top_k)
    if op == "router":
        n = float(s.num_experts)
        flops = 2 * t * d * n + 5 * t * n
        moved = e * (t * d + n * d + t * n) + t * k * (e + 8)
        return flops, moved, e * (t * d + n * d + 3 * t * n) + 16 * t * k
    if op == "permute":
        return 0.0, 2 * e * t * k * d + 32 * t * k, e * t * d * (1 + k) + 48 * t * k
    if op == "unpermute":
        moved = e * (3 * t * k * d + t * d) + 24 * t * k
        return 2 * t * k * d, moved, e * (2 * t * k * d + t * d) + 48 * t * k
    if op in FFN_OPS:
        n = float(s.local_experts)
        flops = 6 * n * t * d * f
        moved = e * (3 * n * d * f + 2 * n * t * d + 4 * n * t * f)
        extra = 2 * (3 * n * d * f + n * t * (d + f)) if dtype == "fp8" else 0.0
        return flops, moved, moved + extra
    if op == "attention":
        weights, act = _attention_widths(s)
        h = float(s.num_heads)
        proj = 2 * t * weights
        scores = 2 * t * t / 2 * h * (s.head_dim + s.v_head_dim)
        moved = e * (weights + t * (2 * d + act))
        return proj + scores, moved, e * (weights + t * (2 * d + 2 * act))
    if op == "memcpy":
        return 0.0, 2 * e * t * d, 2 * e * t * d
    raise ValueError(f"unknown op {op!r}")


def op_output_width(op: str, s: BenchShape) -> float:
    """Output elements per row of an op's GEMMs, over a grouped call's experts (the
    parallelism a GPU fills its SMs with), as one width that charges each GEMM its own
    small-batch cost: an expert FFN runs gate+up (n experts x 2 d_ff wide, 2/3 of its
    FLOPs) then down (n x d_model, 1/3), so ``flops x H / width`` is the sum of
    ``flops_i x H / width_i`` when ``width = 3 n d_model d_ff / (d_model + d_ff)``; the
    router's E scores; the attention block's projected widths; 0 for ops without a GEMM."""
    if op in FFN_OPS:
        d, f = float(s.d_model), float(s.d_ff)
        return 3.0 * s.local_experts * d * f / (d + f)
    if op == "router":
        return float(s.num_experts)
    if op == "attention":
        return float(_attention_widths(s)[1])
    return 0.0


def table_widths(op: str, s: BenchShape) -> dict[str, int]:
    """The width columns a table row of ``op`` records for shape ``s`` (0 where unused).

    A row's shape is these columns; the cost model matches a shape to measured rows by them.
    """
    routed = op in ("router", "permute", "unpermute")
    attn = op == "attention"
    return {
        "d_model": s.d_model,
        "d_ff": s.d_ff if op in FFN_OPS else 0,
        "num_experts": s.local_experts if op in FFN_OPS else (s.num_experts if routed else 0),
        "top_k": s.top_k if routed else 0,
        "num_heads": s.num_heads if attn else 0,
        "num_kv_heads": s.num_kv_heads if attn else 0,
        "head_dim": s.head_dim if attn else 0,
        "v_head_dim": s.v_head_dim if attn else 0,
    }
