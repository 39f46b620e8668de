"""Re-planning over time: incremental re-plans that move few slots, and a replay of a trace
in windows (plan from one window, score on the next, charge the migration).

Moving a slot means fetching one expert's weights over the fabric, so a re-plan is judged
by the balance it buys against the slots it moves (:func:`moesim.placement.metrics.moved_slots`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from moesim.errors import InputError
from moesim.placement.base import Placement
from moesim.placement.choice import ReplicaChoice
from moesim.placement.metrics import expert_loads, moved_slots, planned_balance, score_window
from moesim.placement.planners import _items, replicate_by_load

__all__ = [
    "WindowResult",
    "align_devices",
    "forecast_loads",
    "incremental",
    "planner_for",
    "replay",
    "replay_means",
]


def _overlap(a: np.ndarray, b: np.ndarray, e: int) -> np.ndarray:
    """(Da, Db) experts device i of ``a`` (Da, S) shares with device j of ``b`` (Db, S)."""
    ha = np.zeros((a.shape[0], e))
    hb = np.zeros((b.shape[0], e))
    np.add.at(ha, (np.repeat(np.arange(a.shape[0]), a.shape[1]), a.ravel()), 1)
    np.add.at(hb, (np.repeat(np.arange(b.shape[0]), b.shape[1]), b.ravel()), 1)
    return np.minimum(ha[:, None, :], hb[None, :, :]).sum(axis=2)


def align_devices(old: Placement, new: Placement, devices_per_node: int) -> Placement:
    """``new`` with its devices renumbered (whole nodes to nodes, then devices within each
    node) so that as many slots as possible keep their expert: the same plan, fewer moves.

    Two assignment problems per layer (Hungarian, scipy's ``linear_sum_assignment``).
    """
    num_layers, d, _ = new.slots.shape
    g = devices_per_node
    nodes = d // g
    out = np.empty_like(new.slots)
    for li in range(num_layers):
        ov = _overlap(old.slots[li], new.slots[li], new.num_experts)  # (D old, D new)
        node_ov = ov.reshape(nodes, g, nodes, g).sum(axis=(1, 3))
        old_n, new_n = linear_sum_assignment(-node_ov)
        for on, nn in zip(old_n, new_n, strict=True):
            sub = ov[on * g : (on + 1) * g, nn * g : (nn + 1) * g]
            od, nd = linear_sum_assignment(-sub)
            out[li, on * g + od] = new.slots[li, nn * g + nd]
    return Placement(slots=out, num_experts=new.num_experts)


def forecast_loads(previous: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Loads expected in the next window from two consecutive windows of equal length:
    ``a * last + (1 - a) * previous`` with one weight ``a`` per layer, in [0.5, 2].

    Each expert's next load is taken to continue its trend: ``mu_next = mu_last + delta``.
    Window counts are roughly Poisson (variance ``v`` about the mean), so the estimate
    ``a * last + (1 - a) * previous`` has squared error ``(a - 2)^2 D + (a^2 + (1 - a)^2) V``
    on average over the layer's experts, with ``D`` the mean squared trend and ``V`` the
    mean variance; its minimum is at ``a = (2 D + V) / (D + 2 V)``. ``V`` is the mean of
    the two windows' counts, ``D = max(0, mean((last - previous)^2) - 2 V)`` (the change
    beyond counting noise). Without a trend (``D = 0``) this averages the two windows
    (``a = 1/2``, half the noise of either); with a trend far above noise it extrapolates
    (``a -> 2``). Pooling over the layer's experts keeps the weight itself free of noise.

    The weighted estimate still carries each expert's counting noise, variance
    ``n_i = a^2 last_i + (1 - a)^2 previous_i``, which a planner would read as real skew.
    It is therefore shrunk towards the layer's mean ``m`` by the empirical-Bayes (James-Stein)
    factor ``s^2 / (s^2 + n_i)``, with ``s^2`` the spread of the estimates across the
    layer's experts beyond their mean noise: where the loads barely differ, little of the
    measured difference is believed; where they differ far beyond noise, nearly all. The
    result is clipped at zero.

    Args:
        previous, last: (L, E) loads of two consecutive windows of equal length.
    Returns:
        (L, E) forecast loads.
    """
    prev = np.asarray(previous, dtype=np.float64)
    cur = np.asarray(last, dtype=np.float64)
    change = cur - prev
    var = ((cur + prev) / 2).mean(axis=1, keepdims=True) + 0.5  # (L, 1)
    trend = np.maximum((change**2).mean(axis=1, keepdims=True) - 2 * var, 0.0)
    a = (2 * trend + var) / (trend + 2 * var)
    est = a * cur + (1 - a) * prev
    noise = a**2 * cur + (1 - a) ** 2 * prev + 0.5  # (L, E)
    mean = est.mean(axis=1, keepdims=True)
    spread = ((est - mean) ** 2).mean(axis=1, keepdims=True) - noise.mean(axis=1, keepdims=True)
    spread = np.maximum(spread, 0.0)
    return np.maximum(mean + spread / (spread + noise) * (est - mean), 0.0)


def _device_loads(slots: np.ndarray, share: np.ndarray) -> np.ndarray:
    return share[slots].sum(axis=1)


def _objective(load: np.ndarray) -> np.ndarray:
    """Largest load first, then the spread (sum of squares), as one number; (..., D)."""
    mean = load.mean(axis=-1, keepdims=True)
    return load.max(axis=-1) + 1e-3 * ((load - mean) ** 2).sum(axis=-1) / np.maximum(
        mean[..., 0], 1e-12
    )


def _improve_layer(
    slots: np.ndarray,
    w: np.ndarray,
    budget: int,
    devices_per_node: int | None = None,
    *,
    origin: np.ndarray | None = None,
    keep_replicas: bool = False,
) -> np.ndarray:
    """Local search on one layer's (D, S) slots under a budget of moved slots: each step
    takes the best of (a) swapping a slot of the most-loaded device with a slot elsewhere
    and (b) overwriting a replica of an expert that has several with a new replica of the
    most-loaded device's heaviest expert, by gain per moved slot, while it lowers the
    planned objective (largest device load, then spread).

    Slots moved are counted against ``origin`` (default: ``slots``) as
    :func:`moesim.placement.metrics.moved_slots` counts them, so a move that puts an expert
    back on a device that held it costs nothing. With ``devices_per_node``, a new replica
    goes to a node that has none of its expert while one exists, and a swap across nodes
    never puts an expert on a node that already hosts it (a nearest replica choice serves
    a node's tokens from one replica per node). ``keep_replicas`` swaps single-replica
    experts only and adds no replicas, so the devices that replicated experts join stay
    joined.
    """
    slots = slots.copy()
    d, s = slots.shape
    e = w.size
    rows_d = np.repeat(np.arange(d), s)
    had = np.zeros((d, e), dtype=bool)  # experts each device held at the origin
    had[rows_d, (slots if origin is None else origin).ravel()] = True
    node = np.arange(d) // (devices_per_node or d)
    used = int((~had[rows_d, slots.ravel()]).sum())
    for _ in range(4 * budget + 8):  # each step lowers the objective; a cap all the same
        count = np.bincount(slots.ravel(), minlength=e)
        share = w / np.maximum(count, 1)
        load = _device_loads(slots, share)
        cur = float(_objective(load))
        top = int(np.argmax(load))
        hosts = np.zeros((d, e), dtype=bool)
        hosts[rows_d, slots.ravel()] = True
        # best gain per moved slot (a move that costs none counts as half a slot); a move
        # must lower the objective and fit the budget
        best: tuple[float, Any] = (1e-12 * max(cur, 1.0), None)
        # (a) swaps: slot i of `top` with slot (j, k) of another device
        a = slots[top]  # (S,)
        b = slots  # (D, S)
        ok = ~hosts[:, a].T[:, :, None] & ~hosts[top, b][None, :, :]  # (S, D, S)
        ok[:, top, :] = False
        if keep_replicas:
            ok &= (count[a] == 1)[:, None, None] & (count[b] == 1)[None, :, :]
        if devices_per_node is not None:
            nh = np.zeros((int(node[-1]) + 1, e), dtype=bool)
            nh[node[rows_d], slots.ravel()] = True
            bad = nh[node][:, a].T[:, :, None] | nh[node[top], b][None, :, :]  # (S, D, S)
            ok &= ~((node != node[top])[None, :, None] & bad)
        # slots moved: top gets b, loses a; device j gets a, loses b
        cost = (
            (~had[top, b]).astype(np.int64)[None, :, :]
            - (~had[top, a]).astype(np.int64)[:, None, None]
            + (~had[:, a]).T[:, :, None]
            - (~had[np.arange(d)[:, None], b])[None, :, :]
        )
        ok &= used + cost <= budget
        if ok.any():
            delta = share[b][None, :, :] - share[a][:, None, None]  # gain of `top`
            new_top = load[top] + delta
            new_other = load[None, :, None] - delta
            cand = np.where(ok, np.maximum(new_top, new_other), np.inf)
            i, j, k = np.unravel_index(np.argmin(cand), cand.shape)
            trial = load.copy()
            trial[top] = new_top[i, j, k]
            trial[j] = new_other[i, j, k]
            gain = cur - float(_objective(trial))
            c = int(cost[i, j, k])
            if gain / max(c, 0.5) > best[0]:
                best = (gain / max(c, 0.5), ("swap", i, j, k, c))
        # (b) replicate the heaviest expert of `top` into a slot of a multi-replica expert
        x = int(slots[top][np.argmax(share[slots[top]])])
        free = (count[slots] >= 2) & (slots != x) & ~hosts[:, [x]] & (not keep_replicas)
        rcost = (~had[:, [x]]).astype(np.int64) - ~had[np.arange(d)[:, None], slots]  # (D, S)
        free &= used + rcost <= budget
        if devices_per_node is not None:
            new_node = ~np.isin(node, node[hosts[:, x]])[:, None]
            if (free & new_node).any():
                free &= new_node
        cand_dev, cand_slot = np.nonzero(free)
        if cand_dev.size:
            trials = np.repeat(load[None, :], cand_dev.size, axis=0)  # (C, D)
            rx = count[x]
            trials -= hosts[:, x][None, :] * (w[x] / rx - w[x] / (rx + 1))
            cx = slots[cand_dev, cand_slot]
            rc = count[cx]
            trials += hosts[:, cx].T * (w[cx] / (rc - 1) - w[cx] / rc)[:, None]
            rows = np.arange(cand_dev.size)
            trials[rows, cand_dev] += w[x] / (rx + 1) - w[cx] / (rc - 1)
            per = (cur - _objective(trials)) / np.maximum(rcost[cand_dev, cand_slot], 0.5)
            ci = int(np.argmax(per))
            if per[ci] > best[0]:
                c = int(rcost[cand_dev[ci], cand_slot[ci]])
                best = (float(per[ci]), ("rep", int(cand_dev[ci]), int(cand_slot[ci]), x, c))
        move = best[1]
        if move is None:
            break
        if move[0] == "swap":
            _, i, j, k, c = move
            slots[top, i], slots[j, k] = slots[j, k], slots[top, i]
        else:
            _, dv, sl, ex, c = move
            slots[dv, sl] = ex
        used += c
    return slots


def _sticky_pack(
    previous: np.ndarray,
    w: np.ndarray,
    count: np.ndarray,
    tolerance: np.ndarray,
    devices_per_node: int,
) -> np.ndarray:
    """Replicas onto devices close to ``previous``: LPT over the replicas (heaviest first),
    each to a device with a free slot that does not host its expert yet, on a node without
    it while one exists, whose load exceeds the least-loaded such device's by at most
    ``tolerance`` times the replica's load; among those, preferably (1) outside the flex
    component of the expert's first replica (as the affinity planner joins devices,
    :func:`moesim.placement._compiled.pack_connected_kernel`), then (2) a device that held the
    expert in ``previous`` (no move), then the least loaded. Tolerance 0 is LPT; a large
    one keeps experts where they were.

    Args:
        previous: (B, D, S) slots to stay close to; w: (B, E) loads; count: (B, E) replica
            counts, each row summing to D * S; tolerance: (B,).
    Returns:
        (B, D, S) slots.
    """
    b, d, s = previous.shape
    e = w.shape[1]
    exp, share = _items(count, w)  # (B, N)
    rows = np.arange(b)
    dev_node = np.arange(d) // devices_per_node
    nodes = int(dev_node[-1]) + 1
    had = np.zeros((b, d, e), dtype=bool)
    had[np.repeat(rows, d * s), np.tile(np.repeat(np.arange(d), s), b), previous.ravel()] = True
    hosts = np.zeros((b, d, e), dtype=bool)
    node_hosts = np.zeros((b, nodes, e), dtype=bool)
    load = np.zeros((b, d))
    fill = np.zeros((b, d), dtype=np.int64)
    comp = np.tile(np.arange(d), (b, 1))
    first = np.full((b, e), -1)
    multi = np.take_along_axis(count, exp, axis=1) > 1  # (B, N)
    out = np.empty((b, d, s), dtype=np.int32)
    for i in range(exp.shape[1]):
        ei, sh = exp[:, i], share[:, i]
        ok = (fill < s) & ~hosts[rows, :, ei]
        fresh = ok & ~node_hosts[rows[:, None], dev_node[None, :], ei[:, None]]
        ok = np.where(fresh.any(axis=1, keepdims=True), fresh, ok)
        key = np.where(ok, load, np.inf)
        near = key <= key.min(axis=1, keepdims=True) + (tolerance * sh)[:, None]
        f = first[rows, ei]
        joins = multi[:, i] & (f >= 0)
        if joins.any():
            other = near & (comp != comp[rows, f][:, None])
            near = np.where((joins & other.any(axis=1))[:, None], other, near)
        stay = near & had[rows, :, ei]
        near = np.where(stay.any(axis=1, keepdims=True), stay, near)
        pick = np.argmin(np.where(near, key, np.inf), axis=1)
        out[rows, pick, fill[rows, pick]] = ei
        fill[rows, pick] += 1
        load[rows, pick] += sh
        hosts[rows, pick, ei] = True
        had[rows, pick, ei] = False  # a second replica there would be a move
        node_hosts[rows, dev_node[pick], ei] = True
        if joins.any():
            merge = joins[:, None] & (comp == comp[rows, pick][:, None])
            comp = np.where(merge, comp[rows, f][:, None], comp)
        first[rows, ei] = np.where(f >= 0, f, pick)
    return out


# tolerances tried by the move-limited re-plan: 0.25 ... 64 (x sqrt 2), then "stay put"
_TOLERANCES = np.concatenate([0.25 * 2.0 ** (np.arange(17) / 2), [1e12]])


def incremental(
    previous: Placement,
    loads: np.ndarray,
    *,
    max_moved_share: float,
    target: Placement | None = None,
    devices_per_node: int | None = None,
    repack_share: float = 0.8,
) -> Placement:
    """A re-plan for ``loads`` (L, E) that moves at most ``max_moved_share`` of the slots of
    every layer away from ``previous``.

    When a full re-plan ``target`` is given, its devices are first renumbered to match
    ``previous`` (:func:`align_devices`); layers where it then moves few enough slots take
    it. The other layers are re-packed the way the planners pack (replica counts by load
    per replica, replicas of an expert on distinct nodes, joining devices into flex
    components) but close to ``previous`` (:func:`_sticky_pack`, with the smallest
    tolerance that moves at most ``repack_share`` of the budget), then improved by local
    search with the rest of the budget (:func:`_improve_layer`, keeping the replicated
    experts in place). A layer no re-pack fits improves ``previous`` by local search alone.
    """
    if not 0 <= max_moved_share <= 1:
        raise InputError("must be between 0 and 1", field="max_moved_share", value=max_moved_share)
    w = np.asarray(loads, dtype=np.float64)
    num_layers, d, s = previous.slots.shape
    budget = int(np.floor(max_moved_share * d * s))
    g = devices_per_node or d
    out = previous.slots.copy()
    todo = np.arange(num_layers)
    if target is not None:
        aligned = align_devices(previous, target, g)
        fits = np.array(
            [
                moved_slots(
                    Placement(previous.slots[li : li + 1], previous.num_experts),
                    Placement(aligned.slots[li : li + 1], previous.num_experts),
                )
                <= budget
                for li in range(num_layers)
            ]
        )
        out[fits] = aligned.slots[fits]
        todo = np.flatnonzero(~fits)
    if not todo.size:
        return Placement(slots=out, num_experts=previous.num_experts)
    t = _TOLERANCES.size
    w_t = w[todo] + 1e-12 * (w[todo].sum(axis=1, keepdims=True) == 0)
    count = replicate_by_load(w_t, d * s, d)  # (B, E)
    packed = _sticky_pack(
        np.repeat(previous.slots[todo], t, axis=0),
        np.repeat(w_t, t, axis=0),
        np.repeat(count, t, axis=0),
        np.tile(_TOLERANCES, todo.size),
        g,
    ).reshape(todo.size, t, d, s)
    for bi, li in enumerate(todo.tolist()):
        old = Placement(previous.slots[li : li + 1], previous.num_experts)
        moved = np.array(
            [moved_slots(old, Placement(packed[bi, ti][None], old.num_experts)) for ti in range(t)]
        )
        fit = np.flatnonzero(moved <= repack_share * budget)
        if fit.size:
            out[li] = _improve_layer(
                packed[bi, fit[0]], w[li], budget, g if devices_per_node else None,
                origin=previous.slots[li], keep_replicas=True,
            )  # fmt: skip
        else:
            out[li] = _improve_layer(previous.slots[li], w[li], budget, devices_per_node)
    return Placement(slots=out, num_experts=previous.num_experts)


@dataclass(frozen=True)
class WindowResult:
    """One re-plan: planned from window ``window - 1``, scored on ``window``."""

    window: int
    plan_ms: float
    moved_share: float
    migration_bytes: float
    planned_balance: float
    score: dict[str, float] = field(default_factory=dict)


def replay_means(results: list[WindowResult]) -> dict[str, float]:
    """Means over one :func:`replay`: every score (balance, remote nodes, inter-node bytes,
    ...) over all scored windows; ``moved_share``, ``migration_bytes`` and ``plan_ms`` over
    the re-plans, every window after the first (which only plans), 0 where there is none."""
    later = results[1:]
    out = {k: float(np.mean([r.score[k] for r in results])) for k in results[0].score}
    for k in ("moved_share", "migration_bytes", "plan_ms"):
        out[k] = float(np.mean([getattr(r, k) for r in later])) if later else 0.0
    return out


def planner_for(
    strategy: str,
    *,
    nodes: int,
    devices_per_node: int,
    redundant: int,
    max_slots_per_device: int | None = None,
    groups: int | None = None,
) -> Callable[[np.ndarray, np.ndarray], Placement]:
    """``planner(loads (L, E), window ids (L, n, K)) -> Placement`` for :func:`replay`:
    :func:`moesim.placement.planners.plan` with ``strategy`` on this cluster (``groups``:
    expert groups of the hierarchical planners); ``affinity`` also counts the window's
    co-activation and cross-layer affinity."""
    from moesim.placement.affinity import coactivation
    from moesim.placement.planners import plan, ready

    ready(strategy)

    def planner(loads: np.ndarray, ids: np.ndarray) -> Placement:
        co = cross = None
        if strategy == "affinity":
            co, cross = coactivation(ids, loads.shape[1])
        return plan(
            loads,
            strategy,
            nodes=nodes,
            devices_per_node=devices_per_node,
            redundant=redundant,
            max_slots_per_device=max_slots_per_device,
            groups=groups,
            coactivation=co,
            cross_layer=cross,
        )

    return planner


def replay(
    expert_ids: np.ndarray,
    window_tokens: int,
    planner: Callable[[np.ndarray, np.ndarray], Placement],
    *,
    devices_per_node: int,
    tokens_per_batch: int,
    replica_choice: ReplicaChoice = "nearest",
    expert_bytes: float = 0.0,
    bytes_per_assignment: float = 0.0,
    max_moved_share: float | None = None,
    static: bool = False,
    forecast: bool = True,
    num_experts: int | None = None,
) -> list[WindowResult]:
    """Replay a trace in windows of ``window_tokens`` tokens: re-plan after each window from
    that window's loads, score the plan on the next window.

    Args:
        expert_ids: (L, N, K) routing.
        planner: ``planner(loads (L, E), window ids (L, n, K)) -> Placement``.
        max_moved_share: limit each re-plan to this share of slots moved
            (:func:`incremental`, the full re-plan as its target).
        static: plan once from the first window and keep that plan.
        forecast: plan from :func:`forecast_loads` of the last two windows (from the
            second re-plan on; the default), else from the last window alone.
        num_experts: E (default: the largest expert id routed, plus one).
    Returns:
        one :class:`WindowResult` per scored window (windows 1, 2, ...).
    """
    n = expert_ids.shape[1]
    windows = n // window_tokens
    if windows < 2:
        raise InputError(
            f"need at least two windows of {window_tokens} tokens", field="window", value=n
        )
    top = int(expert_ids.max()) + 1
    e = top if num_experts is None else num_experts
    if top > e:
        raise InputError(f"expert id beyond {e} experts", field="expert_ids", value=top - 1)
    out: list[WindowResult] = []
    current: Placement | None = None
    for wi in range(1, windows):
        prev_ids = expert_ids[:, (wi - 1) * window_tokens : wi * window_tokens]
        loads = expert_loads(prev_ids, e)
        t0 = time.perf_counter()
        if forecast and wi >= 2:
            older = expert_ids[:, (wi - 2) * window_tokens : (wi - 1) * window_tokens]
            loads = forecast_loads(expert_loads(older, e), loads)
        if current is None or not static:
            new = planner(loads, prev_ids)
            if current is not None and max_moved_share is not None:
                new = incremental(
                    current,
                    loads,
                    max_moved_share=max_moved_share,
                    target=new,
                    devices_per_node=devices_per_node,
                )
        else:
            new = current
        plan_ms = (time.perf_counter() - t0) * 1e3
        moved = 0 if current is None else moved_slots(current, new)
        if e > new.num_experts:
            raise InputError("expert id beyond the plan's experts", field="expert_ids", value=e)
        cur_ids = expert_ids[:, wi * window_tokens : (wi + 1) * window_tokens]
        sc = score_window(
            new,
            cur_ids,
            devices_per_node=devices_per_node,
            tokens_per_batch=tokens_per_batch,
            replica_choice=replica_choice,
        )
        out.append(
            WindowResult(
                window=wi,
                plan_ms=plan_ms,
                moved_share=moved / new.slots.size,
                migration_bytes=moved * expert_bytes,
                planned_balance=float(
                    planned_balance(new, expert_loads(cur_ids, new.num_experts)).mean()
                ),
                score=sc.summary(bytes_per_assignment),
            )
        )
        current = new
    return out
