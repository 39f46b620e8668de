"""Memory a device needs: its weights, its expert slots, optimizer state, activations, KV cache.

The parallelism is the simulator's: every device runs every layer on its own tokens (data
parallel for the dense part, so dense weights are **replicated**), and the routed experts of
each MoE layer are **sharded** by expert parallelism, each device holding its expert slots
(``E / D`` under contiguous placement, one replica when there are more devices than experts).

Assumptions, stated once (every figure in bytes, per device):

- Weights at the precision: bf16 2 B, fp8 1 B, int4 0.5 B per parameter (embeddings,
  norms and the router included, at the same precision).
- Training adds bf16 gradients (2 B) and fp32 Adam state (master weights, first and second
  moments: 12 B) per parameter held, the mixed-precision recipe of Rajbhandari et al.,
  "ZeRO", SC'20, sec. 3.1 (16 B per parameter with the bf16 weights); no ZeRO sharding,
  no activation recomputation, no pipeline parallelism.
- Training activations (16-bit, 2 B per value), per token and per layer, after Korthikanti
  et al., "Reducing Activation Recomputation in Large Transformer Models", MLSys'23, eq. 1:
  the attention block and its two norms keep ``15 h`` bytes (``11 h + 4 h``; the
  ``5 a s / h`` score term is left out, since flash attention keeps no score matrices);
  an FFN of width ``f`` with ``m`` matrices keeps its input ``2 h`` and ``m`` intermediates
  of ``2 f`` (SwiGLU: gate, up, their product; GeLU: up, activation, which gives the paper's
  ``18 h`` for ``f = 4 h`` without the dropout mask). A MoE layer keeps, per assignment,
  the received copy ``2 h``, the expert's intermediates ``2 f m`` and its output ``2 h``,
  for ``capacity_factor * top_k`` assignments per token (the most a device can receive at
  that capacity; ``top_k`` when capacity is unlimited), plus fp32 router logits ``4 E``
  and the shared experts' FFN activations.
- Inference (prefill, decode) keeps one layer's activations alive at a time: the largest
  per-layer figure above, times the device's tokens.
- KV cache, at 2 B per value for bf16 and 1 B for fp8 and int4 (an FP8 KV cache): multi-head
  and grouped-query attention store ``2 * kv_heads * head_dim`` values per token per layer;
  multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, sec. 2.1.2) stores the latent
  ``kv_lora_rank + qk_rope_head_dim``. Decode holds ``tokens_per_device`` sequences (one new
  token each) of ``sequence_length`` tokens; prefill holds the sequences its tokens belong
  to, ``ceil(tokens_per_device / sequence_length)`` of ``sequence_length`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moesim.errors import InputError
from moesim.model.shapes import ModelShape

__all__ = [
    "BYTES_PER_PARAM",
    "OPTIMIZER_BYTES_PER_PARAM",
    "MemoryEstimate",
    "bytes_per_param",
    "contiguous_slots",
    "dense_params",
    "kv_cache_bytes_per_token",
    "layer_activation_bytes_per_token",
    "memory_per_device",
]

BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}
OPTIMIZER_BYTES_PER_PARAM = 14.0  # bf16 gradient 2 B + fp32 master, Adam m and v 12 B
ACTIVATION_BYTES = 2.0  # 16-bit activations
_KV_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 1.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device holds, by component, and the device's HBM capacity."""

    dense_weights_bytes: float
    expert_weights_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    kv_cache_bytes: float
    hbm_bytes: float

    @property
    def total_bytes(self) -> float:
        return (
            self.dense_weights_bytes
            + self.expert_weights_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.kv_cache_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"total_bytes": self.total_bytes}


def bytes_per_param(precision: str) -> float:
    """Weight bytes per parameter at ``precision`` (bf16 2, fp8 1, int4 0.5)."""
    if precision not in BYTES_PER_PARAM:
        raise InputError(
            f"unknown precision; valid: {', '.join(BYTES_PER_PARAM)}",
            field="precision",
            value=precision,
        )
    return BYTES_PER_PARAM[precision]


def contiguous_slots(num_experts: int, num_devices: int) -> int:
    """Expert slots per device per MoE layer under contiguous placement: ``max(E // D, 1)``."""
    return max(num_experts // num_devices, 1)


def dense_params(shape: ModelShape) -> int:
    """Every weight that is not a routed expert (replicated on every device)."""
    return shape.total_params() - shape.num_moe_layers * shape.num_experts * shape.expert_params()


def _ffn_bytes(h: int, d_ff: int, matrices: int) -> float:
    return ACTIVATION_BYTES * (h + matrices * d_ff)


def layer_activation_bytes_per_token(
    shape: ModelShape, *, moe: bool, capacity_factor: float | None
) -> float:
    """Activation bytes one layer keeps per token of the device (see the module docstring)."""
    h, m = shape.d_model, shape.ffn_matrices
    attn = 15.0 * h
    if not moe:
        assert shape.dense_d_ff is not None
        return attn + _ffn_bytes(h, shape.dense_d_ff, m)
    per_assignment = ACTIVATION_BYTES * (2 * h + m * shape.expert_d_ff)
    factor = 1.0 if capacity_factor is None else capacity_factor
    shared = 0.0
    if shape.num_shared_experts:
        d_ff = shape.shared_expert_d_ff or shape.expert_d_ff
        shared = shape.num_shared_experts * _ffn_bytes(h, d_ff, m)
    return attn + 4.0 * shape.num_experts + factor * shape.top_k * per_assignment + shared


def kv_cache_bytes_per_token(shape: ModelShape, precision: str) -> float:
    """KV cache bytes of one token over all layers."""
    if precision not in _KV_BYTES:
        raise InputError("unknown precision", field="precision", value=precision)
    a = shape.attention
    if a.kind == "mla":
        assert a.kv_lora_rank is not None and a.qk_rope_head_dim is not None
        values = a.kv_lora_rank + a.qk_rope_head_dim
    else:
        values = 2 * (a.num_kv_heads or a.num_heads) * shape.head_dim
    stacks = 2 if shape.architecture == "encoder-decoder" else 1
    return _KV_BYTES[precision] * values * shape.num_layers * stacks


def memory_per_device(
    shape: ModelShape,
    *,
    num_devices: int,
    mode: str,
    tokens_per_device: int,
    sequence_length: int,
    precision: str,
    capacity_factor: float | None,
    hbm_bytes: float,
    expert_slots: int | None = None,
) -> MemoryEstimate:
    """Bytes one device holds when ``shape`` runs on ``num_devices`` devices.

    Args:
        expert_slots: expert slots per device per MoE layer; None: contiguous placement.
    Returns:
        the estimate by component (see the module docstring for every assumption).
    """
    bpp = bytes_per_param(precision)
    slots = (
        contiguous_slots(shape.num_experts, num_devices) if expert_slots is None else expert_slots
    )
    dense = dense_params(shape)
    experts = shape.num_moe_layers * slots * shape.expert_params()
    moe_per_token = layer_activation_bytes_per_token(
        shape, moe=True, capacity_factor=capacity_factor
    )
    dense_per_token = (
        layer_activation_bytes_per_token(shape, moe=False, capacity_factor=capacity_factor)
        if shape.num_dense_layers
        else 0.0
    )
    optimizer = kv = 0.0
    if mode == "training":
        optimizer = OPTIMIZER_BYTES_PER_PARAM * (dense + experts)
        act = tokens_per_device * (
            shape.num_moe_layers * moe_per_token + shape.num_dense_layers * dense_per_token
        )
    elif mode in ("prefill", "decode"):
        act = tokens_per_device * max(moe_per_token, dense_per_token)
        if mode == "decode":
            kv_tokens = tokens_per_device * sequence_length
        else:
            kv_tokens = math.ceil(tokens_per_device / sequence_length) * sequence_length
        kv = kv_tokens * kv_cache_bytes_per_token(shape, precision)
    else:
        raise InputError("unknown mode; valid: training, prefill, decode", field="mode", value=mode)
    return MemoryEstimate(
        dense_weights_bytes=dense * bpp,
        expert_weights_bytes=experts * bpp,
        optimizer_bytes=optimizer,
        activation_bytes=act,
        kv_cache_bytes=kv,
        hbm_bytes=float(hbm_bytes),
    )
