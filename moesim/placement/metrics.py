"""How good a placement is: planned and routed balance, remote nodes per token, inter-node
bytes, dropped assignments and slots moved between two placements. Pure functions.

Tokens of a batch are spread over devices the way the simulator does it
(:func:`moesim.sim.replay.route_step`): batch token ``t`` of ``T`` lives on device
``t // (T / D)``. Replica choice and capacity are the simulator's own
(:mod:`moesim.placement.choice`, :mod:`moesim.placement.capacity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.balance import balance_ratio
from moesim.errors import InputError
from moesim.placement.base import Placement
from moesim.placement.capacity import apply_slot_capacity, slot_capacity
from moesim.placement.choice import ReplicaChoice, choose_replicas

__all__ = [
    "WindowScore",
    "expert_loads",
    "moved_share",
    "moved_slots",
    "planned_balance",
    "planned_device_loads",
    "replica_counts",
    "score_window",
]


def expert_loads(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(L, E) int64 assignments per expert of (L, n, K) routing (expert ids per layer)."""
    num_layers = ids.shape[0]
    key = np.arange(num_layers)[:, None] * num_experts + ids.reshape(num_layers, -1)
    counts = np.bincount(key.ravel(), minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts)


def replica_counts(placement: Placement) -> np.ndarray:
    """(L, E) replicas of each expert per layer."""
    num_layers, d, s = placement.slots.shape
    e = placement.num_experts
    key = np.arange(num_layers)[:, None] * e + placement.slots.reshape(num_layers, d * s)
    return np.bincount(key.ravel(), minlength=num_layers * e).reshape(num_layers, e)


def planned_device_loads(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """Planned device load (DESIGN.md): each expert's load split evenly over its replicas,
    summed per device.

    Args:
        loads: (L, E) expert loads.
    Returns:
        (L, D) planned load of each device.
    """
    count = replica_counts(placement)  # (L, E)
    per = np.divide(loads, count, out=np.zeros(count.shape), where=count > 0)
    num_layers = placement.num_layers
    return per[np.arange(num_layers)[:, None, None], placement.slots].sum(axis=2)


def planned_balance(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """(L,) balance ratio (max / mean) of the planned device loads; 1.0 for an empty layer."""
    dl = planned_device_loads(placement, loads)
    mean = dl.mean(axis=1)
    return np.where(mean > 0, dl.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)


def moved_slots(old: Placement, new: Placement) -> int:
    """Slots whose expert weights must be fetched to turn ``old`` into ``new``: per (layer,
    device), the experts of ``new`` beyond those ``old`` already holds (a device may reorder
    its own slots for free)."""
    if old.slots.shape != new.slots.shape or old.num_experts != new.num_experts:
        raise InputError(
            "placements differ in layers, devices, slots or experts",
            field="placement",
            value=[old.slots.shape, new.slots.shape],
        )
    num_layers, d, s = new.slots.shape
    e = new.num_experts
    base = (np.arange(num_layers * d) * e)[:, None]
    size = num_layers * d * e
    have = np.bincount((base + old.slots.reshape(-1, s)).ravel(), minlength=size)
    want = np.bincount((base + new.slots.reshape(-1, s)).ravel(), minlength=size)
    return int(np.maximum(want - have, 0).sum())


def moved_share(old: Placement, new: Placement) -> float:
    """Share of all slots that :func:`moved_slots` counts."""
    return moved_slots(old, new) / new.slots.size


@dataclass(frozen=True)
class WindowScore:
    """A placement routed over the batches of a window, per (batch, layer).

    Attributes:
        balance: (B, L) max / mean device load after replica choice (no capacity limit).
        remote_nodes: (B, L) mean over tokens of the distinct other nodes serving the
            token's experts.
        inter_node_assignments: (B, L) assignments served on another node than the token's.
        dropped_share: (B, L) share of assignments dropped at the per-slot capacity of
            ``capacity_factor`` (0 when dropless, the default).
        assignments: (B, L) assignments routed.
    """

    balance: np.ndarray
    remote_nodes: np.ndarray
    inter_node_assignments: np.ndarray
    dropped_share: np.ndarray
    assignments: np.ndarray

    def summary(self, bytes_per_assignment: float = 0.0) -> dict[str, float]:
        """Mean and p99 balance over batches (of the per-batch mean over layers), remote
        nodes per token, inter-node bytes per batch (dispatch + combine when
        ``bytes_per_assignment`` counts both) and dropped share."""
        per_batch = self.balance.mean(axis=1)  # (B,)
        return {
            "balance_mean": float(per_batch.mean()),
            "balance_p99": float(np.percentile(per_batch, 99)),
            "balance_worst_layer": float(self.balance.max()),
            "remote_nodes_per_token": float(self.remote_nodes.mean()),
            "inter_node_bytes_per_batch": float(
                self.inter_node_assignments.sum(axis=1).mean() * bytes_per_assignment
            ),
            "dropped_share": float(self.dropped_share.mean()),
        }


def score_window(
    placement: Placement,
    expert_ids: np.ndarray,
    *,
    devices_per_node: int,
    tokens_per_batch: int,
    replica_choice: ReplicaChoice = "nearest",
    capacity_factor: float | None = None,
) -> WindowScore:
    """Route a window of tokens batch by batch and measure what the placement achieves.

    Args:
        expert_ids: (L, N, K) experts chosen by each of N tokens per layer; N is cut to a
            whole number of batches.
        tokens_per_batch: tokens per batch, a multiple of the devices.
    """
    num_layers, n, k = expert_ids.shape
    if num_layers != placement.num_layers:
        raise InputError(
            f"placement has {placement.num_layers} layers, routing {num_layers}",
            field="layers",
            value=num_layers,
        )
    d = placement.num_devices
    if tokens_per_batch % d or tokens_per_batch < d:
        raise InputError(
            f"tokens per batch must be a positive multiple of the {d} devices",
            field="tokens_per_batch",
            value=tokens_per_batch,
        )
    batches = n // tokens_per_batch
    if batches < 1:
        raise InputError(
            f"window of {n} tokens holds no batch of {tokens_per_batch}",
            field="window",
            value=n,
        )
    t = tokens_per_batch
    origin_tok = (np.arange(t) // (t // d)).astype(np.int32)  # (T,)
    tok = np.repeat(np.arange(t), k)
    src = origin_tok[tok]
    src_node = src // devices_per_node
    shape = (batches, num_layers)
    bal, remote, inter, drop = (np.zeros(shape) for _ in range(4))
    cap = slot_capacity(capacity_factor, t * k, placement.slots[0].size)
    tables = [placement.replicas(li) for li in range(num_layers)]
    for b in range(batches):
        for li in range(num_layers):
            exp = expert_ids[li, b * t : (b + 1) * t].reshape(-1)
            table, count = tables[li]
            dst = choose_replicas(exp, src, tok, table, count, devices_per_node, replica_choice, d)
            load = np.bincount(dst, minlength=d)
            bal[b, li] = balance_ratio(load)
            if cap is not None:
                ids = exp.reshape(t, k)
                kept = apply_slot_capacity(ids, dst.reshape(t, k), table, cap)[0] >= 0
                drop[b, li] = 1.0 - kept.mean()
            node = (dst // devices_per_node).reshape(t, k)
            far = node != src_node.reshape(t, k)
            inter[b, li] = far.sum()
            srt = np.sort(np.where(far, node, -1), axis=1)
            distinct = (srt[:, 1:] != srt[:, :-1]) & (srt[:, 1:] >= 0)
            remote[b, li] = (distinct.sum(axis=1) + (srt[:, 0] >= 0)).mean()
    return WindowScore(
        balance=bal,
        remote_nodes=remote,
        inter_node_assignments=inter,
        dropped_share=drop,
        assignments=np.full(shape, t * k, dtype=np.float64),
    )
