"""Co-activation statistics the affinity planner uses, from routing arrays."""

from __future__ import annotations

import numpy as np

from moesim.traces.stats import layer_pair_counts

__all__ = ["coactivation"]


def coactivation(expert_ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair counts of a routing window (the same counts ``moesim trace stats`` reports).

    Args:
        expert_ids: (L, N, K) experts of N tokens in L consecutive MoE layers.
    Returns:
        coact: (L, E, E) float32, tokens choosing both i and j in a layer (symmetric).
        cross: (L-1, E, E) float32, tokens choosing i at layer l and j at layer l+1.
    """
    num_layers = expert_ids.shape[0]
    e = num_experts
    coact = np.zeros((num_layers, e, e), dtype=np.float32)
    cross = np.zeros((max(num_layers - 1, 0), e, e), dtype=np.float32)
    for li in range(num_layers):
        prev = expert_ids[li - 1] if li else None
        _, pairs, x = layer_pair_counts(expert_ids[li], prev, e)
        coact[li] = pairs + pairs.T
        if x is not None:
            cross[li - 1] = x
    return coact, cross
