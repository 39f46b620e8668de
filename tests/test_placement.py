"""Placement planners, replica choice and placement metrics: hand-checked tiny cases."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.placement import Placement
from moesim.placement.choice import choose_replicas, rank_in_group
from moesim.placement.metrics import (
    moved_slots,
    planned_balance,
    planned_device_loads,
    score_window,
)
from moesim.placement.planners import STRATEGIES, plan, replicate_by_load, separate_replicas


def _slots(p: Placement) -> list:
    return p.slots[0].tolist()


# ----- planners: one hand-checked case each ------------------------------------------------


def test_contiguous_with_redundant_slots_repeats_experts_in_order():
    # sequence 0 1 2 3 0 1 in blocks of S = 3
    p = plan(np.ones((1, 4)), "contiguous", nodes=1, devices_per_node=2, redundant=2)
    assert _slots(p) == [[0, 1, 2], [3, 0, 1]]


def test_round_robin_skips_devices_that_already_host_the_expert():
    # 0->d0, 1->d1, 2->d0, 3->d1; the replica of 0 starts at d0 (hosts 0) -> d1;
    # the replica of 1 starts at d1 (full) -> d0
    p = plan(np.ones((1, 4)), "round-robin", nodes=1, devices_per_node=2, redundant=2)
    assert _slots(p) == [[0, 2, 1], [1, 3, 0]]


LOADS = np.array([[12.0, 4.0, 2.0, 2.0]])  # 2 nodes x 2 devices, 4 redundant -> S = 2


def test_greedy_gives_each_heavy_expert_one_replica_then_lpt():
    # every expert gets a 2nd replica (budget 4 = E): shares 6 6 2 2 1 1 1 1
    p = plan(LOADS, "greedy", nodes=2, devices_per_node=2, redundant=4)
    assert _slots(p) == [[0, 3], [0, 3], [1, 2], [1, 2]]
    assert planned_device_loads(p, LOADS)[0].tolist() == [7, 7, 3, 3]


def test_eplb_global_replicates_by_load_per_replica():
    # replicas: 0 (12->6), 0 (6->4), 0 (tie 4 vs 4 -> lower id), 1: counts 4 2 1 1.
    # Physical experts 0 1 2 3 0 0 0 1, shares 3 2 2 2 3 3 3 2; heaviest first (ties in
    # slot order): the four 0s to devices 0-3, then 1, 2, 3, 1 to devices 0-3
    p = plan(LOADS, "eplb-global", nodes=2, devices_per_node=2, redundant=4)
    assert _slots(p) == [[0, 1], [0, 2], [0, 3], [0, 1]]
    assert planned_device_loads(p, LOADS)[0].tolist() == [5, 5, 5, 5]


def test_balanced_global_keeps_replicas_on_distinct_devices():
    # the same counts 4 2 1 1; LPT over shares 3 3 3 3 2 2 2 2 avoiding a second copy
    p = plan(LOADS, "balanced-global", nodes=2, devices_per_node=2, redundant=4)
    assert _slots(p) == [[0, 1], [0, 1], [0, 2], [0, 3]]
    assert planned_device_loads(p, LOADS)[0].tolist() == [5, 5, 5, 5]


def test_eplb_hierarchical_places_group_i_on_node_i_and_allows_two_copies_on_a_device():
    # groups {0,1} (16) and {2,3} (4), one per node: EPLB keeps group i on node i.
    # Node 0: 4 slots for loads 12, 4: replicas 0 (12->6), 0 (6->4), counts 3 1; physical
    # experts 0 1 0 0, shares 4 each: in slot order to devices 0, 1, 0, 1 -> [0, 0], [1, 0].
    # Node 1: loads 2, 2: replicas 2 then 3, shares 1 each -> [2, 2], [3, 3]
    p = plan(LOADS, "eplb-hierarchical", nodes=2, devices_per_node=2, redundant=4)
    assert _slots(p) == [[0, 0], [1, 0], [2, 2], [3, 3]]
    assert planned_device_loads(p, LOADS)[0].tolist() == [8, 8, 2, 2]
    # four groups of one expert, two per node, heaviest first to the least-loaded node:
    # 2 (4) -> node 0, 1 (3) -> node 1, 3 (2) -> node 1 (3 < 4), 0 (1) -> node 0; each
    # device's slots heaviest first
    loads = np.array([[1.0, 3.0, 4.0, 2.0]])
    q = plan(loads, "eplb-hierarchical", nodes=2, devices_per_node=1, groups=4)
    assert _slots(q) == [[2, 0], [1, 3]]
    # two groups on two nodes: group i on node i, whatever the loads
    q = plan(loads, "eplb-hierarchical", nodes=2, devices_per_node=1, groups=2)
    assert _slots(q) == [[1, 0], [2, 3]]


def test_balanced_hierarchical_keeps_groups_and_replicas_within_nodes():
    # groups {0,1} (16) and {2,3} (4), one per node; within node 0 experts 0,1 get two
    # replicas each (cap: 2 devices), likewise 2,3 in node 1
    p = plan(LOADS, "balanced-hierarchical", nodes=2, devices_per_node=2, redundant=4)
    assert _slots(p) == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert planned_balance(p, LOADS)[0] == pytest.approx(8 / 5)


def test_shadow_copies_the_hot_expert_to_every_device():
    loads = np.array([[8.0, 8.0, 2.0, 2.0]])
    # expert 0 (8 > mean device load 5) first on all 4 devices (2 each); 1 slot left ->
    # expert 1 (shares 4, 4), then LPT: 1 -> d0, 1 -> d1, 2 -> d2, 3 -> d3
    p = plan(loads, "shadow", nodes=2, devices_per_node=2, redundant=4)
    assert _slots(p) == [[0, 1], [0, 1], [0, 2], [0, 3]]
    g = plan(loads, "eplb-global", nodes=2, devices_per_node=2, redundant=4)
    assert sorted(np.bincount(g.slots.ravel()).tolist()) == [1, 1, 3, 3]


def test_affinity_puts_coactivated_experts_on_one_node():
    coact = np.zeros((1, 4, 4))
    coact[0, 0, 2] = coact[0, 1, 3] = coact[0, 2, 0] = coact[0, 3, 1] = 10  # {0, 2} or {1, 3}
    p = plan(np.ones((1, 4)), "affinity", nodes=2, devices_per_node=2, coactivation=coact)
    assert _slots(p) == [[0], [2], [1], [3]]
    # without co-activation: least-loaded node in turn
    q = plan(np.ones((1, 4)), "affinity", nodes=2, devices_per_node=2)
    assert _slots(q) == [[0], [2], [1], [3]] or _slots(q) == [[0], [1], [2], [3]]


def test_affinity_uses_cross_layer_affinity():
    loads = np.ones((2, 4))
    coact = np.zeros((2, 4, 4))
    coact[0, 0, 2] = coact[0, 1, 3] = coact[0, 2, 0] = coact[0, 3, 1] = 10  # layer 0
    cross = np.zeros((1, 4, 4))
    cross[0, 1, 2] = 10  # layer-0 expert 1 (node 1) feeds layer-1 expert 2
    kw = {"nodes": 2, "devices_per_node": 2, "coactivation": coact}
    # layer 0: 0 -> node 0, 1 -> node 1 (balance), 2 -> node 0 (co-activated with 0), 3
    # layer 1: 0 -> node 0, 1 -> node 1, 2 -> node 1 (fed from expert 1 there), 3 -> node 0
    p = plan(loads, "affinity", cross_layer=cross, cross_weight=1.0, **kw)
    assert p.slots[0, :, 0].tolist() == [0, 2, 1, 3]
    assert p.slots[1, :, 0].tolist() == [0, 3, 1, 2]
    q = plan(loads, "affinity", **kw)  # without it: the least-loaded (first) node on ties
    assert q.slots[1, :, 0].tolist() == [0, 2, 1, 3]


def _flex_components(p, layer):
    """Components of the graph joining devices that share a replicated expert."""
    d = p.num_devices
    comp = list(range(d))

    def root(a):
        while comp[a] != a:
            a = comp[a]
        return a

    for ex in range(p.num_experts):
        devs = np.flatnonzero((p.slots[layer] == ex).any(axis=1))
        for b in devs[1:]:
            comp[root(b)] = root(devs[0])
    return len({root(a) for a in range(d)})


def test_affinity_joins_devices_through_replicas():
    # 8 devices, 8 redundant slots: enough replicas to join all devices into one component,
    # which EPLB's packing (replicas of an expert side by side by load) does not do here
    rng = np.random.default_rng(3)
    loads = rng.zipf(1.5, size=(4, 32)).astype(float)
    kw = {"nodes": 2, "devices_per_node": 4, "redundant": 8}
    p = plan(loads, "affinity", **kw)
    g = plan(loads, "eplb-global", **kw)
    assert [_flex_components(p, li) for li in range(4)] == [1, 1, 1, 1]
    assert sum(_flex_components(g, li) for li in range(4)) > 4
    # and every replica of an expert on its own node while nodes last
    for li in range(4):
        table, count = p.replicas(li)
        for ex in np.flatnonzero(count == 2):
            assert len(set(table[ex, :2] // 4)) == 2


CAPPED = [s for s in STRATEGIES if not s.startswith("eplb-")]  # the planners with a cap


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_planner_fills_every_slot_and_homes_every_expert(strategy):
    rng = np.random.default_rng(1)
    loads = rng.zipf(1.5, size=(3, 16)).astype(float)
    cap = 4 if strategy in CAPPED else None
    p = plan(loads, strategy, nodes=2, devices_per_node=4, redundant=8, max_replicas=cap)
    assert p.slots.shape == (3, 8, 3)
    for layer in range(3):
        _, count = p.replicas(layer)  # raises if an expert is homeless
        assert count.sum() == 24 and count.max() <= (cap or 24)


@pytest.mark.parametrize("strategy", CAPPED)
def test_no_planner_puts_an_expert_twice_on_a_device_when_slots_are_crowded(strategy):
    """Many slots per expert under a replica cap: packing can run out of devices that lack
    an expert while it still has replicas to place (greedy, balanced-* and affinity all
    did). EPLB's own policies allow a second copy on a device, as EPLB does."""
    rng = np.random.default_rng(0)
    cases = [(64, 2, 8, 64, 3), (32, 2, 8, 48, 3), (32, 2, 4, 56, 3), (16, 1, 8, 24, 4),
             (32, 2, 4, 48, 4)]  # fmt: skip
    for e, nodes, g, redundant, cap in cases:
        for loads in (rng.zipf(1.3, size=(3, e)).astype(float), rng.random((3, e)) ** 4 * 100):
            p = plan(loads, strategy, nodes=nodes, devices_per_node=g, redundant=redundant,
                     max_replicas=cap)  # fmt: skip
            for layer in range(3):
                for dev in p.slots[layer]:
                    assert len(set(dev.tolist())) == len(dev), (e, redundant, layer, dev)
                _, count = p.replicas(layer)
                assert count.sum() == e + redundant and count.max() <= cap


def test_separate_replicas_repeats_passes_until_no_copy_can_move():
    # device 2's second 3 cannot move on the first pass (the devices lacking 3, only
    # device 3, hold only 2s, which device 2 has); device 3's swaps then free it
    slots = np.array([[[1, 1, 3], [3, 0, 0], [2, 3, 3], [2, 2, 2]]])
    out = separate_replicas(slots, np.ones((1, 4)), devices_per_node=4)
    assert all(len(set(dev)) == 3 for dev in out[0].tolist())
    assert np.bincount(out[0].ravel()).tolist() == np.bincount(slots[0].ravel()).tolist()


def test_balanced_hierarchical_falls_back_to_global_when_a_node_cannot_fill_its_slots():
    """With one replica per device of a node at most, a node's 2 (or 4) experts cannot
    fill 4 (or 24) slots: balanced-global plans instead, within the replica cap."""
    kw = {"nodes": 2, "devices_per_node": 1, "redundant": 4}
    p = plan(np.ones((1, 4)), "balanced-hierarchical", **kw)
    assert p.slots[0].tolist() == plan(np.ones((1, 4)), "balanced-global", **kw).slots[0].tolist()
    p = plan(np.ones((1, 8)), "balanced-hierarchical", nodes=2, devices_per_node=4, redundant=40,
             max_replicas=8)  # fmt: skip
    assert np.bincount(p.slots[0].ravel()).max() <= 8
    assert all(len(set(dev)) == len(dev) for dev in p.slots[0].tolist())


def test_separate_replicas_swaps_a_second_copy_within_the_node_first():
    # 2 nodes x 2 devices, 2 slots. Loads per replica: expert 0 8/3, 1 9, 2 3, 3 1, 4 2/2.
    # Device 0 holds 0 twice; devices lacking 0 are 1 (experts 1, 2; node 0) and 3
    # (4, 4; node 1): device 1 (same node), and there expert 2 (3 is closer to 8/3 than 9).
    # Then device 3 holds 4 twice; on its node, device 2 lacks 4 and holds 0 and 3: expert
    # 3 (load 1, equal to 4's) moves, and 4 takes its slot.
    slots = np.array([[[0, 0], [1, 2], [0, 3], [4, 4]]])
    loads = np.array([[8.0, 9.0, 3.0, 1.0, 2.0]])
    out = separate_replicas(slots, loads, devices_per_node=2)
    assert out[0].tolist() == [[0, 2], [1, 0], [0, 4], [4, 3]]
    assert slots[0, 0].tolist() == [0, 0]  # the input is not changed
    clean = np.array([[[0, 1], [2, 3]]])
    assert separate_replicas(clean, np.ones((1, 4)), 2) is clean  # nothing to do: as it was


def test_balance_aware_planners_beat_contiguous_on_skew():
    rng = np.random.default_rng(2)
    loads = (np.arange(1, 65) ** -1.0)[rng.permutation(64)][None] * 1000
    bal = {
        s: planned_balance(plan(loads, s, nodes=2, devices_per_node=8, redundant=16), loads)[0]
        for s in STRATEGIES
    }
    assert bal["eplb-global"] < 1.05 and bal["affinity"] < 1.05
    assert bal["eplb-global"] < bal["greedy"] < bal["contiguous"]


def test_replicate_by_load_respects_cap():
    count = replicate_by_load(np.array([[10.0, 1.0, 1.0]]), 6, 2)
    assert count.tolist() == [[2, 2, 2]]


def test_plan_rejects_bad_input():
    with pytest.raises(InputError, match="multiple"):
        plan(np.ones((1, 4)), "greedy", nodes=1, devices_per_node=3)
    with pytest.raises(InputError, match="unknown strategy"):
        plan(np.ones((1, 4)), "magic", nodes=1, devices_per_node=2)
    with pytest.raises(InputError, match="memory"):
        plan(np.ones((1, 4)), "greedy", nodes=1, devices_per_node=2, max_slots_per_device=1)
    with pytest.raises(InputError, match="loads"):
        plan(-np.ones((1, 4)), "greedy", nodes=1, devices_per_node=2)
    with pytest.raises(InputError, match="no replica cap"):
        plan(np.ones((1, 4)), "eplb-global", nodes=1, devices_per_node=2, max_replicas=2)
    with pytest.raises(InputError, match="divide the 4 experts"):
        plan(np.ones((1, 4)), "eplb-hierarchical", nodes=1, devices_per_node=2, groups=3)
    with pytest.raises(InputError, match="groups are for"):
        plan(np.ones((1, 4)), "eplb-global", nodes=1, devices_per_node=2, groups=2)


@pytest.mark.parametrize(
    ("strategy", "kwargs", "field", "value"),
    [
        ("magic", {}, "strategy", "magic"),
        ("greedy", {"max_slots_per_device": 1}, "redundant", 0),
        ("eplb-hierarchical", {"groups": 3}, "groups", 3),
        ("eplb-global", {"groups": 2}, "groups", 2),
    ],
)
def test_plan_errors_name_the_field_and_value(strategy, kwargs, field, value):
    """The one-line error names the offending option and its value."""
    with pytest.raises(InputError) as err:
        plan(np.ones((1, 4)), strategy, nodes=1, devices_per_node=2, **kwargs)
    assert (err.value.field, err.value.value) == (field, value)


# ----- replica choice -------------------------------------------------------------------------


def test_rank_in_group_counts_equal_keys_in_array_order():
    """Keys 0, 1, 2 repeated 50 times: the i-th element is the (i // 3)-th of its key (a
    sort that is not stable would number equal keys in another order)."""
    keys = np.tile(np.arange(3), 50)
    assert rank_in_group(keys).tolist() == (np.arange(150) // 3).tolist()


# expert 0 on devices 0 and 1 (nodes 0 and 1, one device per node), expert 1 on device 0
TABLE = np.array([[0, 1], [0, -1]])
COUNT = np.array([2, 1])


def _choose(experts, origin, policy):
    experts, origin = np.array(experts), np.array(origin)
    return choose_replicas(
        experts, origin, np.arange(experts.size), TABLE, COUNT, 1, policy, 2
    ).tolist()


def test_round_robin_alternates_replicas():
    assert _choose([0, 0, 0, 1], [0, 0, 0, 0], "round-robin") == [0, 1, 0, 0]


def test_nearest_prefers_the_token_device():
    assert _choose([0, 0, 0], [1, 1, 0], "nearest") == [1, 1, 0]


def test_batch_split_evens_device_loads_exactly():
    # expert 1 puts 3 on device 0; expert 0's 3 assignments all go to device 1 -> 3 / 3
    assert _choose([1, 1, 1, 0, 0, 0], [0] * 6, "batch-split") == [0, 0, 0, 1, 1, 1]
    # with expert 1 light: 4 of expert 0 split 2 / 2
    assert sorted(_choose([0, 0, 0, 0], [0] * 4, "batch-split")) == [0, 0, 1, 1]


def test_least_loaded_keeps_tokens_on_their_node():
    # tokens on node 0 must use the node-0 replica even though device 0 is loaded
    assert _choose([1, 1, 0, 0], [0, 0, 0, 0], "least-loaded") == [0, 0, 0, 0]
    # tokens on a node without a replica of expert 1 ... (all nodes host expert 0 here);
    # tokens of node 1 use device 1
    assert _choose([0, 0], [1, 1], "least-loaded") == [1, 1]


# ----- metrics --------------------------------------------------------------------------------


def test_moved_slots_counts_new_experts_per_device():
    old = Placement(np.array([[[0, 1], [2, 3]]]), 4)
    new = Placement(np.array([[[1, 0], [2, 1]]]), 4)  # device 0 reordered, device 1: 3 -> 1
    assert moved_slots(old, new) == 1


def test_score_window_remote_nodes_and_drops():
    # 2 nodes x 1 device, experts 0 on d0 and 1 on d1; 2 tokens, top-2 both {0, 1}
    p = Placement(np.array([[[0], [1]]]), 2)
    ids = np.array([[[0, 1], [0, 1]]])  # (L=1, N=2, K=2)
    sc = score_window(p, ids, devices_per_node=1, tokens_per_batch=2, capacity_factor=1.0)
    assert sc.remote_nodes.tolist() == [[1.0]]  # each token has one expert on the other node
    assert sc.inter_node_assignments.tolist() == [[2.0]]
    assert sc.balance.tolist() == [[1.0]] and sc.dropped_share.tolist() == [[0.0]]
    skew = np.array([[[0, 1], [0, 1]]])
    p2 = Placement(np.array([[[0, 1], [0, 1]]]), 2)  # both experts everywhere
    sc2 = score_window(p2, skew, devices_per_node=1, tokens_per_batch=2)
    assert sc2.remote_nodes.tolist() == [[0.0]]


def test_least_loaded_spreads_tokens_without_a_local_replica():
    # 3 nodes of one device: expert 0 on devices 0 and 1, expert 1 on device 2. Tokens of
    # node 0 use device 0 (local); node 2 has no replica of expert 0, so its two
    # assignments go where the largest load stays smallest: device 1
    table = np.array([[0, 1], [2, -1]])
    count = np.array([2, 1])
    experts = np.array([0, 0, 0, 0])
    origin = np.array([0, 0, 2, 2])
    dst = choose_replicas(experts, origin, np.arange(4), table, count, 1, "least-loaded", 3)
    assert dst.tolist() == [0, 0, 1, 1]
    # batch-split ignores locality but reaches the same min-max loads
    dst = choose_replicas(experts, origin, np.arange(4), table, count, 1, "batch-split", 3)
    assert sorted(np.bincount(dst, minlength=3).tolist()) == [0, 2, 2]


@pytest.mark.parametrize("policy", ["batch-split", "least-loaded"])
def test_load_aware_choice_with_an_expert_twice_on_a_device(policy):
    # expert 0 hosted twice by device 0 and once by device 1: still a 2 / 2 split
    table, count = np.array([[0, 0, 1]]), np.array([3])
    dst = choose_replicas(np.zeros(4, int), np.zeros(4, int), np.arange(4), table, count, 2,
                          policy, 2)  # fmt: skip
    assert sorted(np.bincount(dst, minlength=2).tolist()) == [2, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_split_never_worse_than_nearest(strategy):
    rng = np.random.default_rng(3)
    pop = (np.arange(1, 33) ** -1.0)[rng.permutation(32)]
    ids = np.stack([np.stack([rng.choice(32, 4, replace=False, p=pop / pop.sum())
                              for _ in range(512)]) for _ in range(2)])  # fmt: skip
    loads = np.stack([np.bincount(ids[li].ravel(), minlength=32) for li in range(2)])
    p = plan(loads, strategy, nodes=2, devices_per_node=4, redundant=8)
    kw = {"devices_per_node": 4, "tokens_per_batch": 256}
    near = score_window(p, ids, replica_choice="nearest", **kw).balance
    split = score_window(p, ids, replica_choice="batch-split", **kw).balance
    assert (split <= near + 1e-12).all()


def _assign_nodes_reference(exp, share, nodes, per_node, e, coact, cross, cw, tolerance):
    """The node assignment written with numpy over the layers (the compiled kernel's spec)."""
    num_layers, n = exp.shape
    rows = np.arange(num_layers)
    row_node = rows * nodes
    at_all = (rows[:, None] * e + exp).T
    slack = (tolerance * share).T[:, :, None]
    key_load = np.zeros(num_layers * nodes)
    fill = np.zeros(num_layers * nodes, dtype=np.int64)
    big = float(share.sum(axis=1).max()) + 1.0
    hosted = np.zeros((num_layers * e, nodes))
    aff = np.zeros((num_layers * nodes, e), dtype=np.float32)
    co = None if coact is None else np.asarray(coact, dtype=np.float32).reshape(-1, e)
    x = None if cross is None else np.asarray(cross, dtype=np.float32).reshape(-1, e)
    node_of = np.empty((n, num_layers), dtype=np.int64)
    for i in range(n):
        at = at_all[i]
        key = key_load.reshape(num_layers, nodes) + hosted[at]
        near = key <= key.min(axis=1)[:, None] + slack[i]
        a = aff[(row_node[:, None] + np.arange(nodes)), exp[:, i][:, None]]
        pick = np.argmax(np.where(near, a - 1e-9 * key, -np.inf), axis=1)
        node_of[i] = pick
        r = row_node + pick
        f = fill[r] + 1
        fill[r] = f
        key_load[r] += share.T[i] + np.where(f < per_node, 0.0, np.inf)
        hosted.reshape(-1)[at * nodes + pick] += big
        if co is not None:
            aff[r] += co[at]
        if x is not None:
            aff[r[:-1] + nodes] += cw * x[at[:-1]]
    return node_of.T


def _skewed_items(rng, num_layers, e, slots, max_rep, zipf):
    """Replica counts by load of Zipf-skewed random loads, and the replicas (heaviest
    first) of each layer, as the affinity planner makes them."""
    from moesim.placement.planners import _items

    w = rng.zipf(zipf, size=(num_layers, e)).astype(float)
    count = replicate_by_load(w, slots, max_rep)
    return (count, *_items(count, w))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_node_assignment_equals_its_numpy_spec(seed):
    from moesim.placement.planners import _assign_nodes

    rng = np.random.default_rng(seed)
    num_layers, e, nodes, g, s = 5, 32, 4, 2, 5
    _, exp, share = _skewed_items(rng, num_layers, e, nodes * g * s, nodes * g, 1.5)
    co = rng.poisson(3.0, size=(num_layers, e, e)).astype(float)
    co = co + co.transpose(0, 2, 1)
    cross = rng.poisson(2.0, size=(num_layers - 1, e, e)).astype(float)
    # integer counts and a weight of 0.5 add exactly in float32; fractions and 0.3 do not,
    # so the kernel must also add in the specification's order
    frac = co * rng.uniform(0.9, 1.1, size=co.shape)
    for c, x, cw in (
        (co, cross, 0.5),
        (frac, cross * 1.37, 0.3),
        (co, None, 0.5),
        (None, None, 0.5),
    ):
        got = _assign_nodes(exp, share, nodes, g * s, e, c, x, cw, 0.5)
        want = _assign_nodes_reference(exp, share, nodes, g * s, e, c, x, cw, 0.5)
        np.testing.assert_array_equal(got, want)


def _pack_connected_reference(exp, share, node_of, replicated, nodes, g, s, num_experts):
    """The device packing written with numpy over the layers (the compiled kernel's spec)."""
    num_layers, m = exp.shape
    d = nodes * g
    rows = np.arange(num_layers)
    base = rows * num_experts
    load = np.zeros((num_layers, d))
    fill = np.zeros((num_layers, d), dtype=np.int64)
    key_load = np.zeros((num_layers, d))
    hosted = np.zeros((num_layers * num_experts, d), dtype=bool)
    comp = np.tile(np.arange(d), (num_layers, 1))
    key_node = key_load.reshape(num_layers, nodes, g)
    hosted_node = hosted.reshape(-1, nodes, g)
    comp_node = comp.reshape(num_layers, nodes, g)
    first = np.full(num_layers * num_experts, -1)
    out = np.full((num_layers, d, s), -1, dtype=np.int32)
    for i in range(m):
        ei, sh, nd = exp[:, i], share[:, i], node_of[:, i]
        at = base + ei
        key = np.where(hosted_node[at, nd], np.inf, key_node[rows, nd])
        key = np.where(np.isinf(key).all(axis=1, keepdims=True), key_node[rows, nd], key)
        f = first[at]
        joins = replicated[:, i] & (f >= 0)
        if joins.any():
            fc = comp[rows, f]
            other = comp_node[rows, nd] != fc[:, None]
            least = key.min(axis=1)
            near = other & (key <= (least + sh)[:, None])
            key = np.where((joins & near.any(axis=1))[:, None] & ~near, np.inf, key)
        pick = nd * g + np.argmin(key, axis=1)
        fp = fill[rows, pick]
        out[rows, pick, fp] = ei
        fill[rows, pick] = fp + 1
        load[rows, pick] += sh
        key_load[rows, pick] = np.where(fp + 1 < s, load[rows, pick], np.inf)
        hosted[at, pick] = True
        if joins.any():
            merge = joins[:, None] & (comp == comp[rows, pick][:, None])
            np.copyto(comp, fc[:, None], where=merge)
        first[at] = np.where(f >= 0, f, pick)
    return out, fill, load


@pytest.mark.parametrize(
    "seed, e, s, zipf",
    [(0, 32, 5, 1.3), (1, 32, 5, 1.3), (2, 32, 5, 1.3), (3, 16, 12, 1.2)],
)
def test_compiled_device_packing_equals_its_numpy_spec(seed, e, s, zipf):
    """The last case has 6 slots per expert: there a node's devices with a free slot all
    host a replica's expert already, and it takes the least-loaded of them (a second copy,
    which ``separate_replicas`` later moves)."""
    from moesim.placement._compiled import pack_connected_kernel
    from moesim.placement.planners import _assign_nodes

    rng = np.random.default_rng(seed)
    num_layers, nodes, g = 6, 4, 2
    count, exp, share = _skewed_items(rng, num_layers, e, nodes * g * s, nodes * g, zipf)
    node_of = _assign_nodes(exp, share, nodes, g * s, e, None, None, 0.5, 0.5)
    replicated = np.take_along_axis(count, exp, axis=1) > 1
    assert replicated.any()
    args = (exp, share, node_of, replicated, nodes, g, s, e)
    got, want = pack_connected_kernel(*args), _pack_connected_reference(*args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    second_copies = sum(len(set(dev.tolist())) < len(dev) for dev in got[0].reshape(-1, s))
    assert (second_copies > 0) == (e == 16)


def test_ready_loads_the_compiled_kernels_for_the_types_plans_use():
    """After ``ready``, a plan finds its kernels compiled for exactly the argument types it
    passes (no compile or cache load inside a timed plan)."""
    from moesim.placement._compiled import assign_nodes_kernel, pack_connected_kernel
    from moesim.placement.planners import ready

    ready("greedy")  # nothing to load
    ready("affinity")
    kernels = (assign_nodes_kernel, pack_connected_kernel)
    before = [list(k.signatures) for k in kernels]
    assert all(before)
    w = np.random.default_rng(0).random((2, 16))
    plan(w, "affinity", nodes=2, devices_per_node=2, redundant=4)
    co = np.ones((2, 16, 16))
    plan(w, "affinity", nodes=2, devices_per_node=2, redundant=4, coactivation=co)
    assert [list(k.signatures) for k in kernels] == before


def test_planned_contiguous_on_more_devices_than_experts_is_expert_data_parallel():
    # 4 experts on 8 devices, no redundant slots asked: each group of 4 devices holds all 4,
    # as the simulator's contiguous placement
    p = plan(np.ones((1, 4)), "contiguous", nodes=2, devices_per_node=4)
    assert _slots(p) == [[0], [1], [2], [3], [0], [1], [2], [3]]


def test_pack_rest_keeps_a_second_replica_off_the_device_that_hosts_it():
    """Bin 0 (load 1) already holds expert 0, bin 1 (load 5) expert 1: expert 0's next
    replica goes to bin 1, the least-loaded bin that does not host it yet."""
    from moesim.placement.planners import _pack_rest

    out = np.array([[[0, -1], [1, -1]]])
    got = _pack_rest(
        out, np.array([[1, 1]]), np.array([[1.0, 5.0]]), np.array([[0]]), np.array([[2.0]]), 2
    )
    assert got.tolist() == [[[0, -1], [1, 0]]]


def test_sequence_deal_doubles_up_only_when_every_free_device_hosts_the_expert():
    """Experts 0, 0, 0, 1 on 2 devices of 2 slots, all starting at device 0: the second 0
    skips device 0 (hosts it) for device 1; the third finds both hosting it and takes
    the first free one, device 0; 1 gets the last slot, on device 1."""
    from moesim.placement.base import sequence_deal

    got = sequence_deal(np.array([0, 0, 0, 1]), 2, 2, np.zeros(4, dtype=np.int64))
    assert got.tolist() == [[0, 0], [0, 1]]


def test_contiguous_refusal_names_the_placement_field():
    from moesim.errors import InputError
    from moesim.placement.base import contiguous

    with pytest.raises(InputError, match=r"experts \(6\) to be a multiple of devices \(4\)") as e:
        contiguous(6, 4, 1)
    assert (e.value.field, e.value.value) == ("placement", "contiguous")
