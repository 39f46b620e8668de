"""How many expert slots fit on a device: HBM minus the dense weights, over expert size."""

from __future__ import annotations

import math

from moesim.costs.memory import BYTES_PER_PARAM, bytes_per_param, dense_params
from moesim.hardware import HardwareProfile
from moesim.model.shapes import ModelShape

__all__ = ["expert_bytes", "max_expert_slots"]


def expert_bytes(shape: ModelShape, dtype: str = "bf16") -> float:
    """Weight bytes of one routed expert (what moving one slot transfers)."""
    return shape.expert_param_bytes(bytes_per_param(dtype))


def max_expert_slots(
    shape: ModelShape,
    hw: HardwareProfile,
    dtype: str = "bf16",
    *,
    reserve_fraction: float = 0.2,
) -> int:
    """Expert slots per MoE layer that fit one device.

    Every device holds all non-expert weights (attention, dense FFNs, shared experts,
    embeddings: data-parallel copies) plus ``S`` routed-expert slots in each MoE layer;
    ``reserve_fraction`` of HBM is kept for activations, KV cache and workspace.
    ``S = floor((HBM * (1 - reserve) - dense bytes) / (MoE layers * expert bytes))``.
    """
    per_param = BYTES_PER_PARAM.get(dtype, 2.0)
    dense_bytes = dense_params(shape) * per_param
    free = hw.memory.hbm_bytes * (1 - reserve_fraction) - dense_bytes
    per_slot = shape.num_moe_layers * expert_bytes(shape, dtype)
    return max(0, math.floor(free / per_slot))
