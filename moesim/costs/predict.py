"""What the simulator believes one kernel takes: ``moesim kernels predict``.

Every op is timed by the function the simulator's program builder calls for it
(:mod:`moesim.sim.program`, :func:`moesim.costs.roofline.layer_costs`), on the profile's
cost model, so a user can ask about any kernel and get the figure a simulation would use:

==================  =======================================================================
op                  what, per device
==================  =======================================================================
``expert_ffn``      G local experts' full FFN (SwiGLU: gate+up and down) as one grouped
                    GEMM call, M rows each (the ``experts`` phase)
``attention``       the attention block of T tokens (projections, scores, norms)
``attention_scores``  its scores alone (FlashAttention's kernel): causal over the sequence
``router``          the router GEMM and top-k of T tokens
``shared_experts``  the shared experts of T tokens
``permute``         permute of T tokens x top-k copies (memory-bound; ``unpermute`` alike)
==================  =======================================================================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.costs.model import CostModel, cost_model_for
from moesim.costs.roofline import layer_costs, permute_us
from moesim.costs.work import BenchShape
from moesim.errors import InputError
from moesim.hardware import HardwareProfile
from moesim.model.shapes import ModelShape

__all__ = ["PREDICT_OPS", "predict_op"]

PREDICT_OPS = (
    "expert_ffn",
    "attention",
    "attention_scores",
    "router",
    "shared_experts",
    "permute",
    "unpermute",
)


def predict_op(
    op: str,
    hw: HardwareProfile,
    shape: ModelShape,
    *,
    dtype: str,
    tokens_per_expert: int | None = None,
    experts: int | None = None,
    tokens: int | None = None,
    sequence_length: int = 4096,
    mode: str = "prefill",
    model: CostModel | None = None,
) -> dict[str, Any]:
    """Time of one call of ``op`` (see the module docstring) and what it was asked."""
    model = cost_model_for(hw) if model is None else model
    if op not in PREDICT_OPS:
        raise InputError(f"valid: {', '.join(PREDICT_OPS)}", field="op", value=op)
    out: dict[str, Any] = {"op": op, "hardware": hw.name, "model": shape.name, "dtype": dtype}
    if op == "expert_ffn":
        for name, value in (("tokens-per-expert", tokens_per_expert), ("experts", experts)):
            if value is None or value < 1:
                raise InputError("give a positive count for expert_ffn", field=name, value=value)
        assert tokens_per_expert is not None and experts is not None
        bench = BenchShape.from_model(shape, local_experts=experts)
        t = model.grouped_ffn_us(np.full((1, experts), float(tokens_per_expert)), bench, dtype)
        out |= {"tokens_per_expert": tokens_per_expert, "experts": experts}
        return out | {"time_us": float(t[0])}
    if tokens is None or tokens < 1:
        raise InputError(f"give a positive token count for {op}", field="tokens", value=tokens)
    if sequence_length < 1:
        raise InputError("must be at least 1", field="sequence-length", value=sequence_length)
    if op == "shared_experts" and not shape.num_shared_experts:
        raise InputError(f"{shape.name} has no shared experts", field="op", value=op)
    out |= {"tokens": tokens}
    if op in ("permute", "unpermute"):
        return out | {"time_us": float(permute_us(tokens * shape.top_k, shape.d_model, hw, dtype))}
    costs = layer_costs(
        shape, hw, tokens=tokens, sequence_length=sequence_length, mode=mode, dtype=dtype,
        model=model,
    )  # fmt: skip
    out |= {"sequence_length": sequence_length, "mode": mode}
    times = {
        "attention": costs.attention_us,
        "attention_scores": costs.scores_us,
        "router": costs.router_us,
        "shared_experts": costs.shared_us,
    }
    return out | {"time_us": float(times[op])}
