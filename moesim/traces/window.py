"""The part of a trace a run replays, read one layer at a time.

A run of S steps on D devices with T tokens each replays the trace's first
``min(N, S x D x T)`` tokens (in token order; :func:`moesim.sim.replay.step_tokens`
wraps around the N tokens of the trace). :func:`read_replay` walks the trace layer by
layer (:func:`~moesim.traces.store.iter_layer_batches`, so every batch passes
:func:`~moesim.traces.store.check_layer`) and keeps only what a run uses:

* the replayed tokens' expert ids, in the smallest integer type that holds them (one byte
  per assignment up to 256 experts);
* per layer, each expert's assignments over the whole trace (the loads a placement
  planner balances);
* on request, the co-activation counts the affinity planner takes, accumulated batch by
  batch (:func:`moesim.traces.stats.layer_pair_counts`).

Gate weights, steps and tokens are dropped batch by batch, so memory holds the kept ids,
one batch, and (for co-activation) the previous layer's ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.errors import InputError
from moesim.traces.stats import layer_pair_counts
from moesim.traces.store import TraceInfo, id_dtype, iter_layer_batches, open_trace, prefetch

__all__ = ["ReplayTrace", "read_replay"]


@dataclass(frozen=True)
class ReplayTrace:
    """The tokens of a trace that a run replays, and the trace-wide counts it needs.

    Attributes:
        expert_ids: (L, M, K) the first M tokens' experts (in token order), unsigned ints.
        num_tokens: N, tokens in the whole trace (M <= N).
        loads: (L, E) int64 assignments per expert over all N tokens.
        coactivation: (coact (L, E, E), cross (L-1, E, E)) float32 over all N tokens, as
            :func:`moesim.placement.affinity.coactivation` returns them; None unless asked.
    """

    expert_ids: np.ndarray
    num_tokens: int
    layers: tuple[int, ...]
    num_experts: int
    loads: np.ndarray
    coactivation: tuple[np.ndarray, np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def held_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    def mapped(self, src: list[int]) -> ReplayTrace:
        """The trace as a model's MoE layers see it: MoE layer i replays trace layer index
        ``src[i]`` (its ids and loads). Co-activation pairs consecutive trace layers, which a
        mapping breaks, so it is dropped (the affinity planner refuses a mapped trace)."""
        idx = np.asarray(src, dtype=np.int64)
        return replace(
            self,
            expert_ids=self.expert_ids[idx],
            layers=tuple(self.layers[i] for i in src),
            loads=self.loads[idx],
            coactivation=None,
        )

    def layer_ids(self, li: int, positions: np.ndarray) -> np.ndarray:
        """(n, K) int32 experts of the tokens at ``positions`` (in token order) in trace
        layer ``li``; every position must be one of the held tokens."""
        if positions.size and int(positions.max()) >= self.held_tokens:
            raise ValueError(
                f"token position {int(positions.max())} was not read: only the first "
                f"{self.held_tokens} tokens are held"
            )
        return self.expert_ids[li, positions].astype(np.int32)


def _token_ranks(info: TraceInfo) -> np.ndarray | None:
    """Each row's position in ascending token order (stable), as :func:`read_trace` orders
    the tokens; None when the rows are in token order already (the usual case)."""
    parts = info.files[info.layers[0]]
    try:
        tok = np.concatenate(
            [pq.read_table(p, columns=["token"]).column("token").to_numpy() for p in parts]
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", file=parts[0]) from None
    if tok.size < 2 or bool((tok[1:] >= tok[:-1]).all()):
        return None
    rank = np.empty(tok.size, dtype=np.int64)
    rank[np.argsort(tok, kind="stable")] = np.arange(tok.size)
    return rank


def read_replay(
    path: str | Path,
    held_tokens: int | None = None,
    *,
    pairs: bool = False,
    batch_rows: int = 1 << 16,
) -> ReplayTrace:
    """Read the trace at ``path`` one layer at a time, keeping the expert ids of its first
    ``held_tokens`` tokens in token order (None: all), every layer's expert loads and,
    with ``pairs``, its co-activation counts. Every batch is checked as it is read."""
    info = open_trace(path)
    n, e, k = info.num_tokens, info.num_experts, info.top_k
    layers = info.layers
    m = n if held_tokens is None else min(n, held_tokens)
    rank = _token_ranks(info)
    ids = np.empty((len(layers), m, k), dtype=id_dtype(e))
    loads = np.zeros((len(layers), e), dtype=np.int64)
    coact = np.zeros((len(layers), e, e), dtype=np.float32) if pairs else None
    cross = np.zeros((max(len(layers) - 1, 0), e, e), dtype=np.float32) if pairs else None
    # co-activation pairs a layer with the previous one, row by row: one layer's ids in rows
    prev = np.empty((n, k), dtype=id_dtype(e)) if pairs else None
    cur = np.empty((n, k), dtype=id_dtype(e)) if pairs else None
    index = {layer: li for li, layer in enumerate(layers)}
    pair_sum = cross_sum = None
    last = -1
    for b in prefetch(iter_layer_batches(info, batch_rows=batch_rows)):
        li, rows = index[b.layer], b.expert_ids.shape[0]
        if li != last and pairs:  # a new layer: the finished one's pair counts
            _store_pairs(coact, cross, last, pair_sum, cross_sum)
            pair_sum, cross_sum = np.zeros((e, e), np.int64), np.zeros((e, e), np.int64)
            prev, cur = cur, prev
        last = li
        loads[li] += np.bincount(b.expert_ids.reshape(-1), minlength=e)
        if rank is None:
            if b.start < m:
                ids[li, b.start : min(m, b.start + rows)] = b.expert_ids[: m - b.start]
        else:
            pos = rank[b.start : b.start + rows]
            keep = pos < m
            ids[li, pos[keep]] = b.expert_ids[keep]
        if pairs:
            assert cur is not None and prev is not None
            assert pair_sum is not None and cross_sum is not None
            cur[b.start : b.start + rows] = b.expert_ids
            _, p, x = layer_pair_counts(
                b.expert_ids, prev[b.start : b.start + rows] if li else None, e
            )
            pair_sum += p
            if x is not None:
                cross_sum += x
    if pairs:
        _store_pairs(coact, cross, last, pair_sum, cross_sum)
    return ReplayTrace(
        expert_ids=ids,
        num_tokens=n,
        layers=layers,
        num_experts=e,
        loads=loads,
        coactivation=None if coact is None or cross is None else (coact, cross),
        meta=info.meta,
    )


def _store_pairs(
    coact: np.ndarray | None,
    cross: np.ndarray | None,
    li: int,
    pair_sum: np.ndarray | None,
    cross_sum: np.ndarray | None,
) -> None:
    """Layer ``li``'s accumulated counts into the float32 arrays the planner takes."""
    if li < 0 or coact is None or cross is None or pair_sum is None or cross_sum is None:
        return
    coact[li] = pair_sum + pair_sum.T
    if li:
        cross[li - 1] = cross_sum
