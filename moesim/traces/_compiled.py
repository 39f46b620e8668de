"""A layer's expert, pair and cross-layer counts, compiled (numba).

The same counts as the numpy form kept in ``tests/test_trace_tools.py`` (one
``np.bincount`` over integer keys per slot), bit for bit; compiled, a token's 8 + 28 + 64
increments (top-8) cost no key arrays: the numpy form wrote, scanned and counted about 100
eight-byte keys per token and layer, most of ``moesim trace stats``' time. Imported lazily
(numba takes a moment to import) and cached on disk after its first compilation. It
releases the GIL, so several batches count at once in threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["layer_counts_kernel"]


@njit(cache=True, nogil=True)
def layer_counts_kernel(  # pragma: no cover - compiled; tested through moesim.traces.stats
    ids: np.ndarray, prev: np.ndarray, has_prev: bool, num_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of one batch: ``ids`` (n, K) this layer's experts (checked: 0..E-1, no expert
    twice in a row), ``prev`` (n, K) the same tokens' experts one layer before (read only
    when ``has_prev``).

    Returns:
        counts (E,) assignments per expert; pairs (E * E,) tokens choosing both i < j, at
        i * E + j; cross (E * E,) tokens choosing i in ``prev`` and j in ``ids``, at
        i * E + j (all zeros without ``has_prev``). All int64.
    """
    e = num_experts
    n, k = ids.shape
    counts = np.zeros(e, dtype=np.int64)
    pairs = np.zeros(e * e, dtype=np.int64)
    cross = np.zeros(e * e, dtype=np.int64)
    row = np.empty(k, dtype=np.int64)
    for t in range(n):
        for a in range(k):
            row[a] = ids[t, a]
            counts[row[a]] += 1
        for a in range(k - 1):
            x = row[a]
            for b in range(a + 1, k):
                y = row[b]
                if x < y:
                    pairs[x * e + y] += 1
                else:
                    pairs[y * e + x] += 1
        if has_prev:
            for a in range(k):
                base = np.int64(prev[t, a]) * e
                for b in range(k):
                    cross[base + row[b]] += 1
    return counts, pairs, cross
