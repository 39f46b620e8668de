"""Compute-time models. For now a roofline of the hardware profile; measured tables come later."""

from moesim.costs.roofline import (
    BYTES_PER_ELEMENT,
    LayerCosts,
    expert_ffn_time_us,
    gemm_time_us,
    layer_costs,
    memory_time_us,
)

__all__ = [
    "BYTES_PER_ELEMENT",
    "LayerCosts",
    "expert_ffn_time_us",
    "gemm_time_us",
    "layer_costs",
    "memory_time_us",
]
