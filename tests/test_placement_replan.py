"""Move-limited re-plans: the sticky re-pack and the local search's move accounting."""

from __future__ import annotations

import numpy as np

from moesim.placement.base import Placement
from moesim.placement.metrics import moved_slots, planned_balance
from moesim.placement.planners import plan
from moesim.placement.replan import _improve_layer, _sticky_pack, incremental


def test_sticky_pack_is_lpt_at_zero_tolerance_and_stays_put_at_a_large_one():
    prev = np.array([[[0, 1], [2, 3]]], np.int32)  # one node of two devices
    w = np.array([[4.0, 3.0, 2.0, 1.0]])
    ones = np.ones((1, 4), np.int64)
    # LPT by hand: 0 (4) -> dev 0 (tie; held it), 1 (3) -> dev 1, 2 (2) -> dev 1 (3 < 4),
    # 3 (1) -> dev 0 (4 < 5)
    lpt = _sticky_pack(prev, w, ones, np.array([0.0]), 2)
    assert [sorted(x) for x in lpt[0].tolist()] == [[0, 3], [1, 2]]
    stay = _sticky_pack(prev, w, ones, np.array([1e12]), 2)
    assert [sorted(x) for x in stay[0].tolist()] == [[0, 1], [2, 3]]


def test_sticky_pack_puts_replicas_on_distinct_nodes():
    prev = np.array([[[0, 1], [0, 2], [3, 4], [5, 1]]], np.int32)  # two nodes of two devices
    w = np.array([[10.0, 6, 1, 1, 1, 1]])
    count = np.array([[2, 2, 1, 1, 1, 1]])
    out = _sticky_pack(prev, w, count, np.array([1e12]), 2)[0]
    for ex in (0, 1):
        devs = np.flatnonzero((out == ex).any(axis=1))
        assert len(set((devs // 2).tolist())) == 2  # one replica on each node


def test_local_search_counts_moves_against_the_origin():
    origin = np.array([[0, 1], [2, 3]], np.int32)
    slots = np.array([[0, 2], [1, 3]], np.int32)  # two slots moved already; loads 8 and 2
    w = np.array([4.0, 1.0, 4.0, 1.0])
    out = _improve_layer(slots, w, 2, origin=origin)
    a, b = Placement(origin[None], 4), Placement(out[None], 4)
    assert moved_slots(a, b) <= 2  # a swap back (or 2 <-> 3) moves nothing more
    assert planned_balance(b, w[None])[0] == 1.0  # 5 and 5
    # counted from the current slots, the budget is spent: nothing changes
    assert (_improve_layer(slots, w, 0) == slots).all()


def test_incremental_stays_within_budget_with_replicas_on_distinct_nodes():
    rng = np.random.default_rng(1)
    w0 = rng.zipf(1.5, size=(3, 64)).astype(float)
    w1 = np.roll(w0, 7, axis=1)
    old = plan(w0, "affinity", nodes=4, devices_per_node=4, redundant=16)
    new = incremental(old, w1, max_moved_share=0.2, devices_per_node=4)
    for li in range(3):
        one_old = Placement(old.slots[li : li + 1], 64)
        one_new = Placement(new.slots[li : li + 1], 64)
        assert moved_slots(one_old, one_new) <= int(0.2 * 80)
        table, count = new.replicas(li)
        for ex in np.flatnonzero((count > 1) & (count <= 4)):
            nodes = table[ex, : count[ex]] // 4
            assert len(set(nodes.tolist())) == count[ex]
    assert planned_balance(new, w1).mean() < planned_balance(old, w1).mean()


def test_new_replica_overwrites_the_replica_whose_loss_costs_least():
    """Loads 12, 1 | 10, 3 | 10, 3 on 3 devices (experts 2 and 3 on two each): device 0
    carries 13. One moved slot: a second copy of expert 0 on device 1, over expert 2
    there, leaves 6 + 1 | 6 + 1.5 | 10 + 1.5 (largest 11.5); over expert 3, it leaves
    6 + 1 | 5 + 6 | 5 + 3 (largest 11): the light expert's slot is taken. No swap helps
    (expert 0 alone anywhere is >= 13.5)."""
    slots = np.array([[0, 1], [2, 3], [2, 3]])
    out = _improve_layer(slots, np.array([12.0, 1.0, 10.0, 3.0]), 1)
    assert out.tolist() == [[0, 1], [2, 0], [2, 3]]


def test_sticky_pack_never_puts_two_replicas_on_one_device():
    """Loads 6, 7, 1 (expert 1 twice, 3.5 each) on 2 devices of 2 slots, one node,
    previously 1, 2 | 0, 1, tolerance 0.5: expert 0 (6) stays on device 1; expert 1's
    first replica stays on device 0 (load 0 vs 6); its second must go to device 1, the
    one device without it; expert 2 takes the last slot: where everything was."""
    out = _sticky_pack(
        np.array([[[1, 2], [0, 1]]]),
        np.array([[6.0, 7.0, 1.0]]),
        np.array([[1, 2, 1]]),
        np.array([0.5]),
        2,
    )
    assert out.tolist() == [[[1, 2], [0, 1]]]


def test_sticky_pack_keeps_replicas_out_of_their_first_replicas_component():
    """Loads 12, 8, 1, 13 (experts 0 and 3 twice) on 3 devices of 2 slots, one node,
    previously 0, 3 | 0, 3 | 2, 1, tolerance large (stay put): 1 (8) stays on device 2;
    3's first replica stays on device 0 and its second on device 1, joining devices 0 and
    1 into one component; 0's first replica stays on device 0, so its second avoids that
    component and goes to device 2 (not back to device 1); 2 takes device 1's last slot."""
    out = _sticky_pack(
        np.array([[[0, 3], [0, 3], [2, 1]]]),
        np.array([[12.0, 8.0, 1.0, 13.0]]),
        np.array([[2, 1, 1, 2]]),
        np.array([1e12]),
        3,
    )
    assert out.tolist() == [[[3, 0], [3, 2], [1, 0]]]


def test_a_new_replica_is_kept_when_undoing_it_would_reload_its_device():
    """Loads 19, 16, 13 on 2 devices, 0, 1 | 2, 1 (expert 1 twice, 8 each): device 0
    carries 27. Overwriting expert 1's copy on device 1 with a second copy of expert 0
    leaves 9.5 + 16 | 13 + 9.5 (largest 25.5); a move back (free: it restores device 1's
    own slot) would make device 0 carry 19 + 8 = 27 again, so none is made."""
    out = _improve_layer(np.array([[0, 1], [2, 1]]), np.array([19.0, 16.0, 13.0]), 1)
    assert out.tolist() == [[0, 1], [2, 0]]
