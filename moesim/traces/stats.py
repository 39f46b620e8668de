"""Statistics of a routing trace, computed in one streaming pass.

Per layer: expert counts, ``expert_balance`` (max / mean assignments per logical expert:
the same figure ``moesim simulate`` reports under that name, see
:mod:`moesim.balance`), entropy of the load
distribution, the most co-activated expert pairs within tokens; per pair of consecutive
trace layers: the strongest expert affinities (expert i at layer a and expert j at the
next layer chosen by the same token).

Everything is a ``np.bincount`` over integer keys built from the (n, K) id arrays, so
the pass runs at memory speed. The trace is read one layer after another, so memory does
not grow with the number of layers.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from moesim.balance import balance_ratio
from moesim.traces.store import id_dtype, iter_layer_batches, open_trace, prefetch

__all__ = ["layer_pair_counts", "trace_stats"]


def _layer_keys(
    ids: np.ndarray, prev: np.ndarray | None, e: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Counts of one layer's batch: per expert (E,), per expert pair within a token (E*E,),
    and per (previous-layer expert, this-layer expert) pair of the same token (E*E,)."""
    from moesim.traces._compiled import layer_counts_kernel

    counts, pairs, cross = layer_counts_kernel(
        ids, ids if prev is None else prev, prev is not None, e
    )
    return counts, pairs, None if prev is None else cross


def layer_pair_counts(
    ids: np.ndarray, prev: np.ndarray | None, num_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Counts of one layer's (n, K) ids: per expert (E,), co-activated pairs within a token
    (E, E) upper triangle (lower id first), and (previous-layer expert, this-layer expert)
    pairs of the same token (E, E) when ``prev`` (n, K) is given."""
    c, p, x = _layer_keys(ids, prev, num_experts)
    e = num_experts
    return c, p.reshape(e, e), None if x is None else x.reshape(e, e)


def _top_pairs(
    matrix: np.ndarray,
    row_totals: np.ndarray,
    col_totals: np.ndarray,
    total: float,
    n: int,
    *,
    symmetric: bool,
) -> list[dict[str, Any]]:
    """The ``n`` largest cells: counts, P(j | i) and lift = observed / expected."""
    m = np.triu(matrix, 1) if symmetric else matrix
    flat = np.argsort(m, axis=None, kind="stable")[::-1][:n]
    out = []
    for f in flat:
        i, j = divmod(int(f), m.shape[1])
        c = int(m[i, j])
        if c == 0:
            break
        expected = row_totals[i] * col_totals[j] / total if total else 0.0
        out.append(
            {
                "experts": [i, j],
                "count": c,
                "p_given_first": round(c / row_totals[i], 6) if row_totals[i] else 0.0,
                "lift": round(c / expected, 4) if expected else 0.0,
            }
        )
    return out


def trace_stats(path: str | Path, *, top: int = 10, batch_rows: int = 1 << 17) -> dict[str, Any]:
    """Stream ``path`` once, one layer after another, and return its statistics as a
    JSON-ready dict. Memory holds a few batches and two layers' ids (this layer's and the
    previous one's, for the cross-layer counts), whatever the number of layers."""
    info = open_trace(path)
    e, k, layers = info.num_experts, info.top_k, list(info.layers)
    counts = {la: np.zeros(e, dtype=np.int64) for la in layers}
    pairs = {la: np.zeros(e * e, dtype=np.int64) for la in layers}
    cross = {la: np.zeros(e * e, dtype=np.int64) for la in layers[:-1]}
    index = {la: li for li, la in enumerate(layers)}
    # the previous layer's ids row by row, and this layer's as they arrive
    prev = np.empty((info.num_tokens, k), dtype=id_dtype(e))
    cur = np.empty_like(prev)
    workers = max(1, min(os.cpu_count() or 1, 4))
    pending: deque[tuple[int, Future[tuple[np.ndarray, np.ndarray, np.ndarray | None]]]] = deque()

    def collect(limit: int) -> None:
        while len(pending) > limit:
            li, job = pending.popleft()
            c, p, x = job.result()
            counts[layers[li]] += c
            pairs[layers[li]] += p
            if x is not None:
                cross[layers[li - 1]] += x

    last = -1
    with ThreadPoolExecutor(workers) as pool:  # numpy's array arithmetic releases the GIL
        for b in prefetch(iter_layer_batches(info, layers, batch_rows, weights=False)):
            li, rows = index[b.layer], b.expert_ids.shape[0]
            if li != last:  # a new layer: the buffers swap once the last one's jobs are done
                collect(0)
                prev, cur, last = cur, prev, li
            cur[b.start : b.start + rows] = b.expert_ids
            before = prev[b.start : b.start + rows] if li else None
            pending.append((li, pool.submit(_layer_keys, b.expert_ids, before, e)))
            collect(2 * workers)
        collect(0)
    out_layers = []
    for li, la in enumerate(layers):
        c = counts[la]
        total = int(c.sum())
        p = c / total if total else c.astype(float)
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        pm = pairs[la].reshape(e, e)
        entry: dict[str, Any] = {
            "layer": la,
            "assignments": total,
            "expert_counts": c.tolist(),
            "expert_balance": round(balance_ratio(c), 6),
            "hot_expert": int(c.argmax()),
            "cold_expert": int(c.argmin()),
            "entropy_bits": round(entropy, 6),
            "entropy_max_bits": round(float(np.log2(e)), 6),
            "top_coactivated_pairs": _top_pairs(
                pm + pm.T, c, c, total * (k - 1) / k if k > 1 else 0, top, symmetric=True
            ),
        }
        if la in cross:
            cm = cross[la].reshape(e, e)
            entry["next_layer"] = layers[li + 1]
            entry["top_next_layer_affinities"] = _top_pairs(
                cm, cm.sum(axis=1), cm.sum(axis=0), float(cm.sum()), top, symmetric=False
            )
        out_layers.append(entry)
    return {
        "trace": str(info.path),
        "model": info.meta.get("model", ""),
        "source": info.meta.get("source", ""),
        "num_experts": e,
        "top_k": k,
        "tokens": info.num_tokens,
        "assignments": info.num_tokens * k * len(layers),
        "layers": out_layers,
    }
