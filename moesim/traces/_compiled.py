"""Trace kernels, compiled (numba): a layer's expert, pair and cross-layer counts, and
the synthetic sampler's first distinct draws of each token.

The counts are the same as the numpy form kept in ``tests/test_trace_tools.py`` (one
``np.bincount`` over integer keys per slot), bit for bit; compiled, a token's 8 + 28 + 64
increments (top-8) cost no key arrays: the numpy form wrote, scanned and counted about 100
eight-byte keys per token and layer, most of ``moesim trace stats``' time. The sampler's walk
keeps what the packed-key sort it replaced kept (the first k distinct of each token's
draws, in draw order), one pass per row instead of a sort, a scatter and a cumulative
sum over all its draws. Imported lazily (numba takes a moment to import) and cached on
disk after its first compilation; both release the GIL, so batches run in threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["layer_counts_kernel", "successive_draws_kernel"]


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


@njit(cache=True, nogil=True)
def successive_draws_kernel(  # pragma: no cover - compiled; tested through sample_experts
    u: np.ndarray, cdf: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first ``k`` distinct categories drawn by ``u`` (n, m) uniforms in [0, 1)
    from the non-decreasing ``cdf`` (E,): draw u is category
    ``min(np.searchsorted(cdf, u * cdf[-1], side="right"), E - 1)``, the first i with
    cdf[i] > u * cdf[-1]. Returns (n, k) int64 categories in order of first appearance,
    -1 after the last found, and (n,) how many were found; a row's draws after its k-th
    distinct one are not looked at.

    The search starts from a guide table: x = u * cdf[-1] falls in bucket
    b = floor(x * B / cdf[-1]) of B = 4 E, and the table holds the answer at
    (b - 1) * cdf[-1] / B, which is at most x whatever the rounding (guide[0] = 0), so
    stepping up from it while cdf[i] <= x ends on x's answer, after about one step."""
    n, m = u.shape
    e = cdf.size
    top = cdf[e - 1]
    buckets = 4 * e
    guide = np.zeros(buckets + 1, dtype=np.int64)
    scale = buckets / top if top > 0 else 0.0
    i = 0
    for b in range(1, buckets + 1):
        y = (b - 1) / scale if scale > 0 else 0.0
        while i < e and cdf[i] <= y:
            i += 1
        guide[b] = i
    out = np.full((n, k), -1, dtype=np.int64)
    found = np.zeros(n, dtype=np.int64)
    seen = np.zeros(e, dtype=np.bool_)  # the current row's picks, cleared after the row
    for t in range(n):
        c = 0
        for j in range(m):
            x = u[t, j] * top
            b = int(x * scale)
            i = guide[min(max(b, 0), buckets)]
            while i < e and cdf[i] <= x:
                i += 1
            cat = min(i, e - 1)
            if not seen[cat]:
                seen[cat] = True
                out[t, c] = cat
                c += 1
                if c == k:
                    break
        for a in range(c):
            seen[out[t, a]] = False
        found[t] = c
    return out, found
