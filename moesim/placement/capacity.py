"""Expert capacity, defined once: per physical expert slot.

Serving and modern training are dropless (vLLM, SGLang, DeepEP-based serving, Megatron's
dropless MoE, DeepSeek-V3 training), so capacity is unlimited unless a capacity factor is
given. With a factor, every physical slot (a logical expert's copy on a device) holds

    ceil(capacity_factor * assignments routed to the layer / physical slots)

assignments, so a replica adds capacity. Assignments are routed to a replica first (see
:mod:`moesim.placement.choice`); what a slot cannot hold overflows: it is dropped (the
token skips that expert) or rerouted to another expert with room.

Priority follows GShard: all first choices (rank 0) in token order, then all second
choices, and so on. A device that hosts one expert twice holds twice the capacity for it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from moesim.placement.choice import copies_per_device, rank_in_group

__all__ = ["Overflow", "apply_slot_capacity", "slot_capacity"]

Overflow = Literal["drop", "reroute"]


def slot_capacity(
    capacity_factor: float | None, assignments: int, physical_slots: int
) -> int | None:
    """``ceil(capacity_factor * assignments / physical_slots)``; None (unlimited, dropless)
    when the factor is None."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * assignments / physical_slots)


def apply_slot_capacity(
    ids: np.ndarray,
    dst: np.ndarray,
    table: np.ndarray,
    capacity: int,
    overflow: Overflow = "drop",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Enforce per-slot capacity on one layer step whose assignments have been routed.

    Each (device, expert) pair holds ``capacity`` times the expert's copies on the device;
    assignments beyond it, in GShard priority, overflow. With ``overflow="reroute"`` an
    overflowing assignment moves to the expert with the least load per physical slot that
    still has room and that the token has not chosen (ties to the lower id), served by that
    expert's replica with the most room (ties to the lower device); one move per token per
    round, rounds until nothing moves. What finds no room is dropped.

    Args:
        ids: (T, K) expert ids; dst: (T, K) serving device of each;
        table: (E, R) replica devices padded with -1.
    Returns:
        expert: (T, K) expert after rerouting, -1 where dropped;
        device: (T, K) serving device, -1 where dropped;
        rerouted: (T, K) bool, True where the assignment moved to another expert.
    """
    t, k = ids.shape
    e = table.shape[0]
    d = int(max(int(table.max()), int(dst.max(initial=-1)))) + 1
    room = capacity * copies_per_device(table, d).reshape(-1)  # (D*E,)
    key = (dst.astype(np.int64) * e + ids).T.reshape(-1)  # (K*T,), priority order
    keep = rank_in_group(key) < room[key]
    expert = np.where(keep, ids.T.reshape(-1), -1).reshape(k, t).T.copy()
    device = np.where(keep, dst.T.reshape(-1), -1).reshape(k, t).T.copy()
    rerouted = np.zeros((t, k), dtype=bool)
    if overflow == "drop" or keep.all():
        return expert, device, rerouted
    room = room - np.bincount(key[keep], minlength=d * e)  # (D*E,) left per pair
    slots = (table >= 0).sum(axis=1)  # (E,) physical slots
    load = np.bincount(ids.reshape(-1)[(expert >= 0).reshape(-1)], minlength=e).astype(float)
    pend_k, pend_t = np.nonzero((expert < 0).T)  # priority order: rank, then token
    while pend_t.size:
        left = room.reshape(d, e).sum(axis=0)  # (E,) room per expert
        if not (left > 0).any():
            break
        chosen = np.zeros((pend_t.size, e), dtype=bool)  # (P, E)
        np.put_along_axis(
            chosen, np.where(expert[pend_t] < 0, ids[pend_t], expert[pend_t]), True, 1
        )
        np.put_along_axis(chosen, ids[pend_t], True, axis=1)
        score = np.where(chosen | (left <= 0)[None, :], np.inf, (load / slots)[None, :])
        target = np.argmin(score, axis=1)
        ok = np.isfinite(score[np.arange(pend_t.size), target])
        # per target expert, as many as it has room for, in priority order
        accept = ok & (rank_in_group(np.where(ok, target, -1)) < left[target])
        # one move per token per round: two of a token's overflows may not pick the same
        # expert; the later ones try again next round, seeing the new choice
        idx = np.flatnonzero(accept)
        _, first = np.unique(pend_t[idx], return_index=True)
        accept[:] = False
        accept[idx[first]] = True
        if not accept.any():
            break
        for x in np.unique(target[accept]).tolist():  # fill x's replicas, most room first
            mine = np.flatnonzero(accept & (target == x))
            pair_room = room.reshape(d, e)[:, x]
            order = np.argsort(-pair_room, kind="stable")
            cum = np.cumsum(pair_room[order])
            dev = order[np.searchsorted(cum, np.arange(mine.size), side="right")]
            expert[pend_t[mine], pend_k[mine]] = x
            device[pend_t[mine], pend_k[mine]] = dev
            np.subtract.at(room, dev * e + x, 1)
            load[x] += mine.size
        rerouted[pend_t[accept], pend_k[accept]] = True
        pend_t, pend_k = pend_t[~accept], pend_k[~accept]
    return expert, device, rerouted
