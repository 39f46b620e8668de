"""Count-level routing: exact inclusion probabilities, count draws, routing from counts."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.placement.base import Placement, contiguous
from moesim.placement.choice import slot_shares
from moesim.sim.counts import draw_counts, inclusion_probabilities, route_counts
from moesim.sim.routing import route_layer
from moesim.traces.synthetic import sample_experts


def _enumerate(p: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of Plackett-Luce top-k by walking every ordered pick."""
    pi = np.zeros(p.size)

    def walk(chosen: tuple[int, ...], prob: float, rest: float) -> None:
        if len(chosen) == k:
            pi[list(chosen)] += prob
            return
        for e in range(p.size):
            if e not in chosen:
                walk((*chosen, e), prob * p[e] / rest, rest - p[e])

    walk((), 1.0, 1.0)
    return pi


@pytest.mark.parametrize(("e", "k", "s"), [(16, 4, 3.0), (12, 5, 1.2), (10, 3, 0.5), (9, 2, 6.0)])
def test_inclusion_probabilities_are_exact(e, k, s):
    logp = -s * np.log(np.arange(1, e + 1.0))
    p = np.exp(logp) / np.exp(logp).sum()
    perm = np.random.default_rng(e).permutation(e)  # any order of the experts
    np.testing.assert_allclose(
        inclusion_probabilities(logp[perm], k), _enumerate(p, k)[perm], atol=1e-12
    )
    pi = inclusion_probabilities(logp, k)
    assert pi.sum() == pytest.approx(k)


def test_uniform_inclusion_is_k_over_e():
    np.testing.assert_allclose(inclusion_probabilities(np.zeros(256), 8), 8 / 256, rtol=1e-12)


@pytest.mark.parametrize(("e", "k", "s"), [(8, 2, 2.0), (16, 4, 1.5), (64, 6, 1.2)])
def test_token_sampler_matches_the_inclusion_law(e, k, s):
    """The per-token sampler (successive sampling, Gumbel completion of short rows) and the
    count-level law agree: every expert's frequency within 5 standard errors."""
    logp = -s * np.log(np.arange(1, e + 1.0))
    n = 200_000
    ids, _ = sample_experts(logp, n, k, np.random.default_rng(3))
    freq = np.bincount(ids.ravel(), minlength=e) / n
    pi = inclusion_probabilities(logp, k)
    z = (freq - pi) / np.sqrt(np.maximum(pi * (1 - pi), 1e-12) / n)
    assert np.abs(z).max() < 5, z


def test_draw_counts_mean_and_bounds():
    pi = inclusion_probabilities(-0.8 * np.log(np.arange(1, 65.0)), 6)
    c = draw_counts(pi, 1000, 4000, 6, np.random.default_rng(0))
    assert c.shape == (4000, 64)
    assert c.min() >= 0 and c.max() <= 1000
    np.testing.assert_allclose(c.mean(axis=0), 1000 * pi, rtol=0.02, atol=0.2)
    var = 1000 * pi * (1 - pi)  # binomial: a token picks an expert at most once
    np.testing.assert_allclose(c.var(axis=0), var, rtol=0.15, atol=0.5)


def test_count_and_token_level_draw_the_same_variance():
    """Zipf 0.8 over 64 experts, top-6: each device's count of the hottest expert has the
    same variance whether drawn per token or per count (binomial, T pi (1 - pi)); the old
    multinomial reading, T pi (1 - pi / k), overstated it 2.4x."""
    logp = -0.8 * np.log(np.arange(1, 65.0))
    pi = inclusion_probabilities(logp, 6)
    hot = int(np.argmax(pi))
    t, d = 256, 3000
    ids, _ = sample_experts(logp, t * d, 6, np.random.default_rng(5))
    per_dev = (ids.reshape(d, t, 6) == hot).sum(axis=(1, 2))  # (D,) token level
    counts = draw_counts(pi, t, d, 6, np.random.default_rng(6))[:, hot]  # count level
    binomial = t * pi[hot] * (1 - pi[hot])
    assert per_dev.var() == pytest.approx(binomial, rel=0.1)
    assert counts.var() == pytest.approx(binomial, rel=0.1)
    assert counts.var() / per_dev.var() == pytest.approx(1.0, abs=0.15)
    # the hottest expert is in 62.76 % of tokens' top-6, so the old reading's variance was
    # (1 - 0.6276 / 6) / (1 - 0.6276) = 2.40 times the binomial one
    assert pi[hot] == pytest.approx(0.6276, abs=1e-4)
    assert (1 - pi[hot] / 6) / (1 - pi[hot]) == pytest.approx(2.40, abs=0.01)


def _tokens_of(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 tokens realising ``counts``, device by device, in expert order."""
    ids = np.concatenate([np.repeat(np.arange(counts.shape[1]), row) for row in counts])
    origin = np.repeat(np.arange(counts.shape[0]), counts.sum(axis=1)).astype(np.int32)
    return ids[:, None], origin


@pytest.mark.parametrize(
    "placement",
    [
        contiguous(8, 16, 1),  # two replicas per expert, on one node
        contiguous(16, 8, 1),  # two experts per device
        Placement(np.array([[[0, 1], [2, 3], [0, 4], [5, 6], [7, 0], [1, 2], [3, 3], [4, 5]]]), 8),
    ],
)
def test_route_counts_equals_token_routing(placement):
    """Without capacity, routing the counts equals routing tokens that realise them (the
    counts are multiples of 4, so a far expert's tokens split evenly over its replicas)."""
    rng = np.random.default_rng(1)
    table, count = placement.replicas(0)
    counts = rng.poisson(24, (placement.num_devices, placement.num_experts)) * 4
    ids, origin = _tokens_of(counts)
    kw = {"devices_per_node": 4}
    tok = route_layer(
        ids, origin, placement.slots[0], table, count, num_experts=placement.num_experts, **kw
    )
    cnt = route_counts(counts, placement.slots[0], table, count, **kw)
    np.testing.assert_allclose(cnt.dispatch, tok.dispatch)
    np.testing.assert_allclose(cnt.device_load, tok.device_load)
    np.testing.assert_allclose(cnt.expert_tokens, tok.expert_tokens)
    assert cnt.assignments == tok.assignments


def test_route_counts_drops_the_same_share_of_every_sender():
    counts = np.array([[5, 1], [4, 1], [3, 0]])
    placement = Placement(np.array([[[0], [1], [1]]]), 2)
    table, count = placement.replicas(0)
    r = route_counts(counts, placement.slots[0], table, count, devices_per_node=3, capacity=6)
    # expert 0's one slot is routed 5 + 4 + 3 = 12 > 6: each sender keeps half; expert 1's
    # two slots (devices 1, 2) get device 1's own assignment, and device 0's split half and
    # half over its node's two replicas (all three devices are one node)
    np.testing.assert_allclose(r.dropped, [2.5, 2.0, 1.5])
    np.testing.assert_allclose(r.dispatch[:, 0], [2.5, 2.0, 1.5])
    np.testing.assert_allclose(r.routed_load, [12, 1.5, 0.5])
    np.testing.assert_allclose(r.device_load, [6, 1.5, 0.5])
    assert r.dropless_capacity_factor == pytest.approx(12 / (14 / 3))  # max slot / mean slot


@pytest.mark.parametrize("policy", ["nearest", "round-robin", "least-loaded", "batch-split"])
def test_route_counts_balances_devices_as_token_routing_does(policy):
    """Every replica choice at count level loads devices as the token level does (the
    counts are multiples of 12, so even splits are whole)."""
    placement = Placement(
        np.array([[[0, 1], [2, 3], [0, 4], [5, 6], [7, 0], [1, 2], [3, 3], [4, 5]]]), 8
    )
    rng = np.random.default_rng(2)
    table, count = placement.replicas(0)
    counts = rng.poisson(8, (8, 8)) * 12
    ids, origin = _tokens_of(counts)
    kw = {"devices_per_node": 4, "replica_choice": policy}
    tok = route_layer(ids, origin, placement.slots[0], table, count, num_experts=8, **kw)
    cnt = route_counts(counts, placement.slots[0], table, count, **kw)
    np.testing.assert_allclose(cnt.device_load, tok.device_load)
    np.testing.assert_allclose(cnt.expert_tokens.sum(), tok.expert_tokens.sum())
    if policy == "nearest":
        np.testing.assert_allclose(cnt.dispatch, tok.dispatch)


def test_slot_shares_nearest_are_the_token_choice_expected():
    """Expert 0 on devices 1, 2 (node 0) and 5 (node 1), 4 devices per node: device 0's
    assignments alternate over its node's two copies, device 1 keeps its own, node 1's
    devices use device 5; round-robin spreads every sender evenly."""
    p = Placement(np.array([[[1], [0], [0], [1], [1], [0], [1], [1]]]), 2)
    table, count = p.replicas(0)
    near = slot_shares(np.zeros(0), p.slots[0], table, count, 4, "nearest")
    assert near[0, [1, 2, 5]].tolist() == [0.5, 0.5, 0.0]
    assert near[1, [1, 2, 5]].tolist() == [1.0, 0.0, 0.0]
    assert near[6, [1, 2, 5]].tolist() == [0.0, 0.0, 1.0]
    rr = slot_shares(np.zeros(0), p.slots[0], table, count, 4, "round-robin")
    np.testing.assert_allclose(rr[6, [1, 2, 5]], [1 / 3, 1 / 3, 1 / 3])


def _first_distinct_reference(u, cdf, k):
    """The numpy form of the sampler's draws: every draw searched, then each row's first k
    distinct in draw order (-1 after the last found)."""
    cand = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), cdf.size - 1)
    out = np.full((u.shape[0], k), -1, dtype=np.int64)
    for t, row in enumerate(cand):
        firsts = row[np.sort(np.unique(row, return_index=True)[1])][:k]
        out[t, : firsts.size] = firsts
    return out, (out >= 0).sum(axis=1)


def test_successive_draws_equal_a_binary_search_and_first_distinct():
    """The compiled draws (a guide table, then stepping up) pick exactly the categories
    np.searchsorted(side="right") picks, and keep each row's first k distinct: at and
    beside every cdf value, over runs of equal values (experts of popularity 0), at 0 and
    at the top, and for rows short of k distinct."""
    from moesim.traces._compiled import successive_draws_kernel

    rng = np.random.default_rng(0)
    p = np.exp(-1.2 * np.log(np.arange(1, 257.0)))
    p[[5, 6, 7, 100]] = 0.0
    for cdf in (np.cumsum(p / p.sum()), np.cumsum(np.ones(8)), np.array([0.0, 0.0, 1e-300])):
        top = cdf[-1]
        near = np.concatenate([cdf, np.nextafter(cdf, -np.inf), np.nextafter(cdf, np.inf)])
        u_near = np.clip(near / top, 0.0, np.nextafter(1.0, 0.0))
        for u in (rng.random((4000, 32)), u_near.reshape(-1, 1), np.array([[0.0], [1 - 2**-53]])):
            for k in (1, 3, 8):
                got = successive_draws_kernel(u, cdf, k)
                want = _first_distinct_reference(u, cdf, k)
                assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_successive_draws_hand_checked():
    """cdf (0.5, 0.5, 0.75, 1): draws 0.1, 0.6, 0.2, 0.9 -> categories 0, 2, 0, 3, so
    top-3 keeps 0, 2, 3 and top-4 finds only those three."""
    from moesim.traces._compiled import successive_draws_kernel

    u = np.array([[0.1, 0.6, 0.2, 0.9]])
    cdf = np.array([0.5, 0.5, 0.75, 1.0])
    ids, found = successive_draws_kernel(u, cdf, 3)
    assert ids.tolist() == [[0, 2, 3]] and found.tolist() == [3]
    ids, found = successive_draws_kernel(u, cdf, 4)
    assert ids.tolist() == [[0, 2, 3, -1]] and found.tolist() == [3]
