"""Count-level routing: per (device, expert) assignment counts instead of per-token choices.

A 2,048-device step of a top-8 model with 4,096 tokens per device is 67 M assignments per
layer; drawing every token's experts costs minutes. For synthetic routing the simulator
only needs how many of each device's tokens pick each expert, and those counts can be
drawn directly:

1. :func:`inclusion_probabilities` — the exact probability ``pi[e]`` that a token's top-k
   (drawn without replacement in proportion to popularity, the Plackett-Luce law of
   :mod:`moesim.traces.synthetic`) contains expert ``e``; ``sum(pi) = k``.
2. :func:`draw_counts` — each device's counts, mean ``T * pi[e]`` and the multinomial
   variance ``T * pi[e] * (1 - pi[e] / k)``: Poisson for small means, normal above.
3. :func:`route_counts` — capacity, replica choice, loads and traffic from the counts,
   the count-level twin of :func:`moesim.sim.routing.route_layer`.

What is lost against per-token routing: which of a token's k choices is which (so capacity
drops by device order rather than GShard's rank-then-token order, there is no reroute
policy, and no per-token de-duplication), and the correlation of one token's choices
across layers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from moesim.sim.routing import LayerRouting

__all__ = ["draw_counts", "inclusion_probabilities", "route_counts"]

_GRID = 513  # quadrature points in log-time (odd, for Simpson's rule)
_POISSON_BELOW = 10.0  # mean count under which draws are Poisson, above normal


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

    Mean ``tokens * pi``, variance as the multinomial of ``tokens * k`` draws over
    ``pi / k``; Poisson where the mean is below 10 (keeps the skew of rare experts),
    rounded normal elsewhere, clipped to ``[0, tokens]``.
    """
    mean = tokens * np.asarray(pi, dtype=np.float64)  # (E,)
    small = mean < _POISSON_BELOW
    big = ~small
    sd = np.sqrt(mean * np.maximum(1 - pi / k, 0.0))
    if big.all():  # one block of normal draws
        z = rng.standard_normal((num_devices, mean.size), dtype=np.float32)
        out = np.rint(mean + sd * z).astype(np.int64)
    else:
        out = np.empty((num_devices, mean.size), dtype=np.int64)
        if small.any():
            out[:, small] = rng.poisson(mean[small], size=(num_devices, int(small.sum())))
        if big.any():
            z = rng.standard_normal((num_devices, int(big.sum())), dtype=np.float32)
            out[:, big] = np.rint(mean[big] + sd[big] * z)
    np.clip(out, 0, tokens, out=out)
    return out


@lru_cache(maxsize=8)
def _replica_maps(
    slots_bytes: bytes,
    slots_shape: tuple[int, int],
    table_bytes: bytes,
    table_shape: tuple[int, int],
    e: int,
    devices_per_node: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What replica choice needs of a placement, (D, E) each: copies of expert e on device
    d; the first replica on d's node (D where none); d's share of e's far traffic."""
    slots = np.frombuffer(slots_bytes, dtype=np.int32).reshape(slots_shape)
    table = np.frombuffer(table_bytes, dtype=np.int32).reshape(table_shape)
    d = slots.shape[0]
    dev = np.arange(d)
    hosts = np.zeros((d, e), dtype=np.int64)
    np.add.at(hosts, (np.repeat(dev, slots.shape[1]), slots.reshape(-1)), 1)
    node = dev // devices_per_node
    rep_dev = table.reshape(-1).astype(np.int64)
    rep_exp = np.repeat(np.arange(e), table.shape[1])
    ok = rep_dev >= 0
    first_on_node = np.full((int(node[-1]) + 1, e), d, dtype=np.int64)  # (N, E)
    np.minimum.at(first_on_node, (node[rep_dev[ok]], rep_exp[ok]), rep_dev[ok])
    share = hosts / np.maximum(hosts.sum(axis=0), 1)[None, :]
    for a in (hosts, first_on_node, share):
        a.setflags(write=False)
    return hosts, first_on_node[node], share


def route_counts(
    counts: np.ndarray,
    slots: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    *,
    devices_per_node: int,
    capacity: int,
) -> LayerRouting:
    """Route one layer step given per (device, expert) counts.

    Capacity keeps each expert's first ``capacity`` assignments in device order (the
    count-level reading of token order) and drops the rest. Replica choice follows
    :func:`moesim.sim.routing.choose_replicas`: the device itself if it hosts the expert,
    else the first replica on its node, else an even split over the replicas (the
    expected counts of ``token mod replicas``, so loads and traffic may be fractional).

    Args:
        counts: (D, E) assignments; slots: (D, S) hosted experts; table: (E, R) replicas
        padded with -1; count: (E,) replicas per expert.
    """
    d, e = counts.shape
    kept = counts
    unlimited = (
        route_counts(counts, slots, table, count, devices_per_node=devices_per_node, capacity=2**62)
        if (counts.sum(axis=0) > capacity).any()
        else None
    )
    dropped = np.zeros(d, dtype=np.int64)
    over = np.flatnonzero(counts.sum(axis=0) > capacity)  # experts that overflow
    if over.size:
        part = counts[:, over]
        before = np.cumsum(part, axis=0) - part  # (D, O) assignments of earlier devices
        kept_part = np.clip(capacity - before, 0, part)
        dropped = (part - kept_part).sum(axis=1)
        kept = counts.copy()
        kept[:, over] = kept_part
    dev = np.arange(d)
    slots = np.ascontiguousarray(slots, dtype=np.int32)
    table = np.ascontiguousarray(table, dtype=np.int32)
    # hosts / target / share (D, E): copies of e on d, the first replica of e on d's node
    # (D where none), d's share of e's far traffic
    hosts, target, share = _replica_maps(
        slots.tobytes(), slots.shape, table.tobytes(), table.shape, e, devices_per_node
    )
    local = (hosts > 0) & (kept > 0)
    near = ~local & (target < d) & (kept > 0)
    far = np.where(local | near, 0, kept).astype(np.float64)  # (D, E)
    inv = (1.0 / count).astype(np.float32)
    far32 = far.astype(np.float32)  # counts stay exact below 2^24
    # far assignments spread over the replicas, slot by slot: (D, D)
    dispatch = np.take(far32, slots[:, 0], axis=1)
    dispatch *= inv[slots[:, 0]][None, :]
    for j in range(1, slots.shape[1]):
        part = np.take(far32, slots[:, j], axis=1)
        part *= inv[slots[:, j]][None, :]
        dispatch += part
    per_dev_exp = share * far.sum(axis=0)[None, :]  # (D, E)
    s_idx, e_idx = np.nonzero(local)  # to the sender itself
    dispatch[dev, dev] += np.bincount(s_idx, weights=kept[s_idx, e_idx], minlength=d)
    per_dev_exp[s_idx, e_idx] += kept[s_idx, e_idx]
    s_idx, e_idx = np.nonzero(near)  # to the first replica on the sender's node
    dst, amount = target[s_idx, e_idx], kept[s_idx, e_idx]
    np.add.at(dispatch, (s_idx, dst), amount)
    np.add.at(per_dev_exp, (dst, e_idx), amount)
    rows = dev[:, None]
    slot_load = per_dev_exp[rows, slots] / hosts[rows, slots]
    mean_slot = counts.sum() / slots.size
    return LayerRouting(
        expert_load=counts.sum(axis=0),
        routed_load=dispatch.sum(axis=0) if unlimited is None else unlimited.routed_load,
        dropless_capacity_factor=float(slot_load.max() / mean_slot)
        if unlimited is None
        else unlimited.dropless_capacity_factor,
        device_load=dispatch.sum(axis=0),
        expert_tokens=slot_load,
        dispatch=dispatch,
        copies=dispatch,
        dropped=dropped,
        rerouted=0,
        assignments=int(counts.sum()),
    )
