"""How many expert slots fit on a device: HBM minus the dense weights, over expert size."""

from __future__ import annotations

import math

from moesim.errors import InputError
from moesim.hardware import HardwareProfile
from moesim.model.shapes import ModelShape

__all__ = ["BYTES_PER_PARAM", "expert_bytes", "max_expert_slots"]

BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}


def expert_bytes(shape: ModelShape, dtype: str = "bf16") -> float:
    """Weight bytes of one routed expert (what moving one slot transfers)."""
    if dtype not in BYTES_PER_PARAM:
        raise InputError(
            f"unknown precision; valid: {', '.join(BYTES_PER_PARAM)}", field="dtype", value=dtype
        )
    return shape.expert_param_bytes(BYTES_PER_PARAM[dtype])


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
    experts_total = shape.num_moe_layers * shape.num_experts * shape.expert_params()
    dense_bytes = (shape.total_params() - experts_total) * per_param
    free = hw.memory.hbm_bytes * (1 - reserve_fraction) - dense_bytes
    per_slot = shape.num_moe_layers * expert_bytes(shape, dtype)
    return max(0, math.floor(free / per_slot))
