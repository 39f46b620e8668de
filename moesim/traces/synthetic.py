"""Seeded synthetic routing for what-if studies."""

from __future__ import annotations

from typing import Literal

import numpy as np

from moesim.traces.store import RoutingTrace

__all__ = ["synthesize"]


def synthesize(
    *,
    num_experts: int,
    top_k: int,
    num_layers: int,
    num_tokens: int,
    distribution: Literal["uniform", "zipf"] = "uniform",
    zipf_s: float = 1.2,
    seed: int = 0,
) -> RoutingTrace:
    """Draw each token's top-k distinct experts from a per-layer popularity law.

    ``uniform`` gives every expert the same popularity; ``zipf`` gives expert of rank r
    popularity ∝ r^-s, with the ranking shuffled independently per layer so hot experts
    differ by layer. Sampling without replacement uses the Gumbel-top-k trick, so the
    whole trace is a handful of array operations.

    Returns a trace with expert_ids (L, N, K) and softmax gate weights over the k picks.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    ids = np.empty((num_layers, num_tokens, top_k), dtype=np.int32)
    ws = np.empty((num_layers, num_tokens, top_k), dtype=np.float32)
    for layer in range(num_layers):
        if distribution == "uniform":
            logp = np.zeros(num_experts)
        else:
            logp = -zipf_s * np.log(ranks)[rng.permutation(num_experts)]
        scores = logp[None, :] + rng.gumbel(size=(num_tokens, num_experts))  # (N, E)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]  # (N, K)
        picked = np.take_along_axis(scores, top, axis=1)
        w = np.exp(picked - picked.max(axis=1, keepdims=True))
        ids[layer] = top
        ws[layer] = w / w.sum(axis=1, keepdims=True)
    return RoutingTrace(
        expert_ids=ids,
        gate_weights=ws,
        steps=np.zeros(num_tokens, dtype=np.int32),
        layers=tuple(range(num_layers)),
        num_experts=num_experts,
        meta={
            "model": "synthetic",
            "source": f"synthetic {distribution}",
            "capture": {"distribution": distribution, "zipf_s": zipf_s, "seed": seed},
        },
    )
