"""Count-level routing: per (device, expert) assignment counts instead of per-token choices.

A 2,048-device step of a top-8 model with 4,096 tokens per device is 67 M assignments per
layer; drawing every token's experts costs minutes. For synthetic routing the simulator
only needs how many of each device's tokens pick each expert, and those counts can be
drawn directly:

1. :func:`inclusion_probabilities` — the exact probability ``pi[e]`` that a token's top-k
   (drawn without replacement in proportion to popularity, the Plackett-Luce law of
   :mod:`moesim.traces.synthetic`) contains expert ``e``; ``sum(pi) = k``.
2. :func:`draw_counts` — each device's counts: a token picks an expert at most once, so a
   device's count of expert ``e`` is binomial, mean ``T * pi[e]`` and variance
   ``T * pi[e] * (1 - pi[e])``, as token-level routing draws it: exact binomial draws
   for small means, normal above.
3. :func:`route_counts` — replica choice (every policy), per-slot capacity, loads and
   traffic from the counts, the count-level twin of :func:`moesim.sim.routing.route_layer`.

What is lost against per-token routing: that each device routes exactly ``T * k``
assignments (each (device, expert) count is drawn on its own, so a device's total varies
around it, and assignments and drop rates count what was drawn); with ``least-loaded`` and
``batch-split``, which sender's assignments go to which replica (loads match the token
level, the (D, D) traffic is the proportional split); which of a token's k choices is
which (so a slot over capacity drops the same fraction of every sender's assignments
rather than GShard's rank-then-token order, and there is no reroute policy); which
assignments share a token (so no de-duplication of copies); and the correlation of one
token's choices across layers. The simulator refuses ``capacity.overflow: reroute`` (with
a capacity factor) and a dispatcher's ``dedup`` other than ``none`` at count level with a
one-line error; ``level: auto`` runs at count level only where none of this changes the
answer (:func:`moesim.sim.prepare.routing_level`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from moesim.placement.choice import ReplicaChoice, slot_shares
from moesim.sim.routing import LayerRouting

__all__ = [
    "draw_counts",
    "draw_counts_layers",
    "inclusion_probabilities",
    "route_counts",
    "route_counts_layers",
]

_GRID = 513  # quadrature points in log-time (odd, for Simpson's rule)
_EXACT_BELOW = 10.0  # mean count under which draws are binomial, above normal


def inclusion_probabilities(logp: np.ndarray, k: int) -> np.ndarray:
    """Probability that expert ``e`` is among a token's ``k`` distinct picks.

    Picks are the first ``k`` arrivals of independent exponential clocks of rates
    ``p = softmax(logp)`` (equivalent to Gumbel-top-k), so::

        pi[e] = integral_0^inf p[e] exp(-p[e] t) P(fewer than k other clocks by t) dt

    The count of other clocks by time ``t`` is Poisson-binomial; its law without expert
    ``e`` comes from the law over all experts by polynomial division, run forward where
    ``e``'s clock has likely not rung and backward where it has (both stable).

    Args:
        logp: (E,) log-popularity. Returns: (E,) float64, summing to ``k``.
    """
    logp = np.asarray(logp, dtype=np.float64)
    order = np.argsort(logp, kind="stable")
    sorted_pi = _inclusion_sorted(logp[order].tobytes(), k)
    out = np.empty_like(sorted_pi)
    out[order] = sorted_pi
    return out


@lru_cache(maxsize=64)
def _inclusion_sorted(logp_bytes: bytes, k: int) -> np.ndarray:
    logp = np.frombuffer(logp_bytes, dtype=np.float64)
    e = logp.size
    if k >= e:
        return np.ones(e)
    p = np.exp(logp - logp.max())
    p /= p.sum()
    p_k = np.sort(p)[-k]  # k-th heaviest: by 60/p_k the top k have all arrived
    t = np.geomspace(1e-7 / p.max(), 60.0 / p_k, _GRID)  # (G,)
    q = -np.expm1(-np.outer(p, t))  # (E, G) P(clock e rang by t)
    # law of the number of clocks rung by t, over all experts: (E+1, G)
    c = np.zeros((e + 1, t.size))
    c[0] = 1.0
    for j in range(e):
        c[1 : j + 2] = c[1 : j + 2] * (1 - q[j]) + c[: j + 1] * q[j]
        c[0] *= 1 - q[j]
    # leave one out: P(N_-e <= k-1) for every e, (E, G)
    below = np.zeros_like(q)
    fwd = q <= 0.5
    a = np.zeros_like(q)
    for n in range(k):  # forward: a_n = (c_n - q a_{n-1}) / (1 - q)
        a = (c[n][None, :] - q * a) / np.where(fwd, 1 - q, 1.0)
        below += np.where(fwd, a, 0.0)
    b = np.zeros_like(q)
    tot = np.zeros_like(q)
    for n in range(e, 0, -1):  # backward: b_{n-1} = (c_n - (1 - q) b_n) / q
        b = (c[n][None, :] - (1 - q) * b) / np.where(fwd, 1.0, q)
        if n - 1 >= k:
            tot += np.where(fwd, 0.0, b)  # P(N_-e >= k) accumulates from the top
    below = np.where(fwd, below, 1.0 - tot)
    below = np.clip(below, 0.0, 1.0)
    f = p[:, None] * np.exp(-np.outer(p, t)) * below * t[None, :]  # integrand in log t
    h = np.log(t[1] / t[0])  # Simpson's rule on the even log-time grid
    w = np.ones(t.size)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    pi = f @ (w * h / 3) + p * t[0]  # + [0, t0], where no other clock has rung yet
    pi = np.clip(pi, 0.0, 1.0)
    return pi * (k / pi.sum())


def draw_counts(
    pi: np.ndarray, tokens: int, num_devices: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """(D, E) int64 assignments of each device's ``tokens`` tokens to each expert.

    Each of the ``tokens`` tokens includes expert ``e`` with probability ``pi[e]`` (once at
    most), so the count is binomial: mean ``tokens * pi[e]``, variance
    ``tokens * pi[e] * (1 - pi[e])``. Drawn exactly (binomial) where the mean is below 10
    (keeps the skew of rare experts), rounded normal elsewhere (a tenth of the cost),
    clipped to ``[0, tokens]``.
    """
    del k  # the law of one expert's count does not depend on the other picks
    pi = np.asarray(pi, dtype=np.float64)
    mean = tokens * pi  # (E,)
    small = mean < _EXACT_BELOW
    big = ~small
    sd = np.sqrt(mean * np.maximum(1 - pi, 0.0))
    if big.all():  # one block of normal draws
        z = rng.standard_normal((num_devices, mean.size), dtype=np.float32)
        out = np.rint(mean + sd * z).astype(np.int64)
    else:
        out = np.empty((num_devices, mean.size), dtype=np.int64)
        if small.any():
            out[:, small] = rng.binomial(tokens, pi[small], size=(num_devices, int(small.sum())))
        if big.any():
            z = rng.standard_normal((num_devices, int(big.sum())), dtype=np.float32)
            out[:, big] = np.rint(mean[big] + sd[big] * z)
    np.clip(out, 0, tokens, out=out)
    return out


def draw_counts_layers(
    pi: np.ndarray, tokens: int, num_devices: int, k: int, rngs: list[np.random.Generator]
) -> np.ndarray:
    """(L, D, E) :func:`draw_counts` of ``L`` layers at once, layer ``l`` drawn from
    ``pi[l]`` with ``rngs[l]``: the same draws (each generator makes the same calls), one
    vectorised pass when every mean is large enough for normal draws."""
    pi = np.asarray(pi, dtype=np.float64)
    mean = tokens * pi  # (L, E)
    if not (mean >= _EXACT_BELOW).all():  # binomial draws somewhere: layer by layer
        return np.stack(
            [draw_counts(p, tokens, num_devices, k, r) for p, r in zip(pi, rngs, strict=True)]
        )
    sd = np.sqrt(mean * np.maximum(1 - pi, 0.0))
    z = np.stack([r.standard_normal((num_devices, pi.shape[1]), dtype=np.float32) for r in rngs])
    out = np.rint(mean[:, None, :] + sd[:, None, :] * z).astype(np.int64)
    np.clip(out, 0, tokens, out=out)
    return out


@lru_cache(maxsize=8)
def _fixed_shares(
    slots_bytes: bytes,
    slots_shape: tuple[int, int],
    table_bytes: bytes,
    table_shape: tuple[int, int],
    devices_per_node: int,
    policy: ReplicaChoice,
) -> np.ndarray:
    """:func:`moesim.placement.choice.slot_shares` of the policies whose shares do not
    depend on the counts, cached per placement layer (read-only)."""
    slots = np.frombuffer(slots_bytes, dtype=np.int32).reshape(slots_shape)
    table = np.frombuffer(table_bytes, dtype=np.int32).reshape(table_shape)
    count = (table >= 0).sum(axis=1)
    out = slot_shares(np.zeros(0), slots, table, count, devices_per_node, policy)
    out.setflags(write=False)
    return out


def route_counts(
    counts: np.ndarray,
    slots: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    *,
    devices_per_node: int,
    capacity: int | None = None,
    replica_choice: ReplicaChoice = "nearest",
) -> LayerRouting:
    """Route one layer step given per (device, expert) counts: the count-level twin of
    :func:`moesim.sim.routing.route_layer`.

    Replica choice gives each (device, expert) count's shares over the expert's replicas
    (:func:`moesim.placement.choice.slot_shares`: the expected shares of the token-level
    choice, so loads and traffic may be fractional). Capacity is per physical slot, as at
    token level; a slot over it keeps the same fraction of every sender's assignments (the
    expectation over token order) and drops the rest.

    Args:
        counts: (D, E) assignments; slots: (D, S) hosted experts; table: (E, R) replicas
        padded with -1; count: (E,) replicas per expert; capacity: assignments per
        physical slot, None for dropless.
    """
    return route_counts_layers(
        counts[None],
        [slots],
        [table],
        [count],
        devices_per_node=devices_per_node,
        capacity=capacity,
        replica_choice=replica_choice,
    )[0]


def route_counts_layers(
    counts: np.ndarray,
    slots: list[np.ndarray],
    tables: list[np.ndarray],
    counts_per_expert: list[np.ndarray],
    *,
    devices_per_node: int,
    capacity: int | None = None,
    replica_choice: ReplicaChoice = "nearest",
) -> list[LayerRouting]:
    """:func:`route_counts` of ``L`` layers at once (one vectorised pass): ``counts``
    (L, D, E); ``slots``, ``tables``, ``counts_per_expert``: each layer's (D, S) hosted
    experts, (E, R) replicas and (E,) replicas per expert. Every layer hosts S slots per
    device."""
    n_layers, d = counts.shape[:2]
    slots = [np.ascontiguousarray(x, dtype=np.int32) for x in slots]
    tables = [np.ascontiguousarray(x, dtype=np.int32) for x in tables]
    cols = np.stack([x.reshape(-1) for x in slots])  # (L, C) expert of each physical slot
    if replica_choice in ("nearest", "round-robin"):
        shares = [
            _fixed_shares(
                x.tobytes(), x.shape, t.tobytes(), t.shape, devices_per_node, replica_choice
            )
            for x, t in zip(slots, tables, strict=True)
        ]
    else:
        shares = [
            slot_shares(c, x, t, n, devices_per_node, replica_choice)
            for c, x, t, n in zip(counts, slots, tables, counts_per_expert, strict=True)
        ]
    # (L, D, C) assignments of each sender to each slot; float32 holds counts exactly below
    # 2^24, and the (D, D*S) matrices dominate the cost at thousands of devices
    flow = np.take_along_axis(counts.astype(np.float32), cols[:, None, :], axis=2)
    flow *= shares[0] if n_layers == 1 else np.stack(shares)
    routed = flow.sum(axis=1, dtype=np.float64)  # (L, C)
    dropped = np.zeros((n_layers, d))
    served = routed
    if capacity is not None and (routed > capacity).any():
        # a layer without a slot over capacity keeps every assignment (keep is 1.0)
        keep = np.minimum(1.0, capacity / np.maximum(routed, 1e-300))
        sent = flow.sum(axis=2, dtype=np.float64)
        flow *= keep.astype(np.float32)[:, None, :]
        dropped = sent - flow.sum(axis=2, dtype=np.float64)
        served = routed * keep
    s = cols.shape[1] // d
    dispatch = flow if s == 1 else flow.reshape(n_layers, d, d, s).sum(axis=3)
    total = counts.sum(axis=(1, 2))
    device_load = served.reshape(n_layers, d, s).sum(axis=2)
    routed_load = routed.reshape(n_layers, d, s).sum(axis=2)
    expert_load = counts.sum(axis=1)
    top = routed.max(axis=1)
    out = []
    for li in range(n_layers):
        mean_slot = float(total[li]) / cols.shape[1]
        out.append(
            LayerRouting(
                device_load=device_load[li],
                expert_tokens=served[li].reshape(d, s),
                dispatch=dispatch[li],
                copies=dispatch[li],
                dropped=dropped[li],
                rerouted=0,
                assignments=int(total[li]),
                expert_load=expert_load[li],
                routed_load=routed_load[li],
                dropless_capacity_factor=float(top[li] / mean_slot) if mean_slot else 1.0,
            )
        )
    return out
