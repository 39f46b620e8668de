import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.placement import Placement, contiguous
from moesim.placement.capacity import apply_slot_capacity, slot_capacity
from moesim.placement.choice import choose_replicas, copies_per_device
from moesim.sim.routing import route_layer, traffic_matrix


def _one_per_device(e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expert i alone on device i: slots (D, 1), its replica table and counts."""
    p = Placement(np.arange(e, dtype=np.int32).reshape(1, e, 1), e)
    table, count = p.replicas(0)
    return p.slots[0], table, count


def _capacity(ids, e, cap, overflow):
    """Per-slot capacity with expert i alone on device i (slot and expert coincide)."""
    _, table, _ = _one_per_device(e)
    return apply_slot_capacity(ids, table[ids, 0], table, cap, overflow)


def test_slot_capacity_formula():
    # 2,048 tokens x top-6 over 64 slots: ceil(1.25 * 12288 / 64) = ceil(240.0) = 240
    assert slot_capacity(1.25, 2048 * 6, 64) == 240
    # the same layer with 32 redundant slots (96 physical): ceil(1.25 * 12288 / 96) = 160
    assert slot_capacity(1.25, 2048 * 6, 96) == 160
    assert slot_capacity(1.1, 20, 4) == 6  # ceil(5.5)
    assert slot_capacity(None, 20, 4) is None  # dropless


def test_drop_follows_gshard_priority():
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    final, device, rerouted = _capacity(ids, 4, 2, "drop")
    # expert 0: first choices of tokens 0,1 fit; token 2's first choice and token 3's
    # second choice overflow.
    assert final.tolist() == [[0, 1], [0, 2], [-1, 1], [3, -1]]
    assert device.tolist() == [[0, 1], [0, 2], [-1, 1], [3, -1]]
    assert not rerouted.any()


def test_a_replica_adds_capacity():
    # 4 tokens pick expert 0 (top-1) on 2 devices; capacity ceil(1.0 * 4 / slots)
    ids = np.zeros((4, 1), dtype=int)
    origin = np.zeros(4, dtype=int)
    one = Placement(np.array([[[0], [1]]]), 2)  # one copy of expert 0: 2 slots in all
    two = Placement(np.array([[[0, 1], [0, 1]]]), 2)  # expert 0 on both devices: 4 slots
    dropped = []
    for p in (one, two):
        table, count = p.replicas(0)
        cap = slot_capacity(1.0, 4, p.slots[0].size)  # one: ceil(4/2) = 2; two: ceil(4/4) = 1
        r = route_layer(
            ids,
            origin,
            p.slots[0],
            table,
            count,
            num_experts=2,
            devices_per_node=2,
            capacity=cap,
            replica_choice="round-robin",
        )
        dropped.append(int(r.dropped.sum()))
    # one copy holds 2 of the 4; two copies hold 1 + 1 of the 4 at half the capacity each
    assert dropped == [2, 2]
    table, count = two.replicas(0)
    r = route_layer(
        ids,
        origin,
        two.slots[0],
        table,
        count,
        num_experts=2,
        devices_per_node=2,
        capacity=2,
        replica_choice="round-robin",
    )
    assert r.dropped.sum() == 0 and r.device_load.tolist() == [2, 2]  # 2 + 2 fit


def test_a_device_hosting_an_expert_twice_holds_twice_its_capacity():
    table = np.array([[0, 0], [1, -1]])  # expert 0 twice on device 0, expert 1 on device 1
    assert copies_per_device(table, 2).tolist() == [[2, 0], [0, 1]]
    ids = np.array([[0], [0], [0], [1], [1], [1]])
    dst = np.array([[0], [0], [0], [1], [1], [1]])
    final, _, _ = apply_slot_capacity(ids, dst, table, 2, "drop")
    assert final.ravel().tolist() == [0, 0, 0, 1, 1, -1]  # 3 <= 2 x 2 fit; 3 > 2 on device 1


def test_reroute_to_least_loaded_expert_with_room():
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    final, device, rerouted = _capacity(ids, 4, 2, "reroute")
    # loads after the first pass: e0 2, e1 2, e2 1, e3 1. Token 2 (rank 0, higher
    # priority) takes expert 2 (least loaded, lower id); token 3 then finds only expert 2,
    # full by now, or experts it already uses -> dropped.
    assert final.tolist() == [[0, 1], [0, 2], [2, 1], [3, -1]]
    assert device.tolist() == [[0, 1], [0, 2], [2, 1], [3, -1]]
    assert rerouted.tolist() == [[False, False], [False, False], [True, False], [False, False]]


def test_reroute_fills_the_replica_with_most_room():
    # expert 0 overflows (capacity 1 per slot); expert 1 has slots on devices 1 and 2, the
    # one on device 1 already holding one assignment: the reroute goes to device 2
    table = np.array([[0, -1], [1, 2]])
    ids = np.array([[0], [1], [0]])
    dst = np.array([[0], [1], [0]])
    final, device, rerouted = apply_slot_capacity(ids, dst, table, 1, "reroute")
    assert final.ravel().tolist() == [0, 1, 1]
    assert device.ravel().tolist() == [0, 1, 2]
    assert rerouted.ravel().tolist() == [False, False, True]


@settings(max_examples=50, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(2, 8),
    cap=st.integers(1, 10),
    seed=st.integers(0, 1000),
    policy=st.sampled_from(["drop", "reroute"]),
)
def test_capacity_invariants(t, e, cap, seed, policy):
    rng = np.random.default_rng(seed)
    k = min(2, e)
    ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)])
    final, _, _ = _capacity(ids, e, cap, policy)
    kept = final[final >= 0]
    assert (np.bincount(kept, minlength=e) <= cap).all()
    # a token never uses one expert twice
    for row in final:
        r = row[row >= 0]
        assert len(set(r.tolist())) == r.size
    if policy == "drop":
        assert ((final == ids) | (final == -1)).all()
    else:  # rerouting never drops more than dropping does
        dropped_only, _, _ = _capacity(ids, e, cap, "drop")
        assert (final < 0).sum() <= (dropped_only < 0).sum()


def test_choose_replicas_prefers_own_device_then_node():
    # expert 0 on devices 1 and 3; 2 devices per node
    table = np.array([[1, 3]])
    count = np.array([2])
    experts = np.zeros(4, dtype=int)
    origin = np.array([1, 2, 0, 3])
    token = np.array([0, 1, 2, 3])
    got = choose_replicas(experts, origin, token, table, count, devices_per_node=2)
    # device 1 hosts it; device 2 is on node 1 with device 3; device 0 shares node 0 with 1
    assert got.tolist() == [1, 3, 1, 3]


def test_nearest_spreads_a_nodes_tokens_over_its_replicas():
    # expert 0 on devices 1 and 2 (node 0) and 5 (node 1), 4 devices per node
    table = np.array([[1, 2, 5]])
    count = np.array([3])
    origin = np.array([0, 0, 0, 0, 1, 6, 6])
    token = np.arange(7)
    got = choose_replicas(np.zeros(7, int), origin, token, table, count, devices_per_node=4)
    # device 0's tokens alternate over the node's two replicas (token mod 2); device 1
    # hosts it; node 1's tokens go to its one replica
    assert got.tolist() == [1, 2, 1, 2, 1, 5, 5]


def test_choose_replicas_round_robin_off_node():
    table = np.array([[2, 3]])
    count = np.array([2])
    got = choose_replicas(np.zeros(4, int), np.zeros(4, int), np.arange(4), table, count, 2)
    assert got.tolist() == [2, 3, 2, 3]


def test_traffic_matrix():
    m = traffic_matrix(np.array([0, 0, 1, 2]), np.array([1, 1, 2, 2]), 3)
    assert m.tolist() == [[0, 2, 0], [0, 0, 1], [0, 0, 1]]


def test_route_layer_loads_and_traffic():
    # 4 experts on 2 devices (experts 0,1 on device 0; 2,3 on device 1), top-2
    p = contiguous(4, 2, 1)
    table, count = p.replicas(0)
    ids = np.array([[0, 2], [1, 3], [2, 3], [0, 1]])
    origin = np.array([0, 0, 1, 1])
    r = route_layer(
        ids, origin, p.slots[0], table, count, num_experts=4, devices_per_node=2, capacity=100
    )
    assert r.device_load.tolist() == [4, 4]
    assert r.expert_tokens.tolist() == [[2, 2], [2, 2]]
    # device 0's tokens: 0->d0, 2->d1, 1->d0, 3->d1 ; device 1's: 2,3 -> d1 ; 0,1 -> d0
    assert r.dispatch.tolist() == [[2, 2], [2, 2]]
    assert r.dropped.tolist() == [0, 0]


def test_contiguous_rejects_uneven_split():
    from moesim.errors import InputError

    with pytest.raises(InputError, match="multiple"):
        contiguous(6, 4, 1)


def test_contiguous_replicates_when_more_devices_than_experts():
    # expert-data parallelism: each group of E consecutive devices holds every expert
    p = contiguous(2, 4, 1)
    assert p.slots[0, :, 0].tolist() == [0, 1, 0, 1]
    table, count = p.replicas(0)
    assert table.tolist() == [[0, 2], [1, 3]]
    assert count.tolist() == [2, 2]


def test_contiguous_is_one_placement_for_the_simulator_and_the_planner():
    from moesim.placement import plan

    for e, d, r in ((8, 4, 0), (4, 2, 2), (2, 4, 2)):
        planned = plan(np.ones((3, e)), "contiguous", nodes=1, devices_per_node=d, redundant=r)
        np.testing.assert_array_equal(planned.slots, contiguous(e, d, 3, redundant=r).slots)
    np.testing.assert_array_equal(contiguous(2, 4, 1).slots, contiguous(2, 4, 1, 2).slots)


def test_reroute_never_gives_a_token_the_same_expert_twice():
    # both of token 0's choices overflow in the same round; they must land on different
    # experts (found by hypothesis: t=8, e=8, cap=2, seed=2)
    ids = np.array([[1, 2], [1, 2], [1, 2], [3, 4]])
    final, _, rerouted = _capacity(ids, 6, 2, "reroute")
    assert final[2].tolist() == [0, 5]  # least-loaded experts with room, lower id first
    assert rerouted[2].all()
    for row in final:
        kept = row[row >= 0]
        assert len(set(kept.tolist())) == kept.size


def _sim_imports(paths) -> list[str]:
    """Every ``moesim.sim`` module the given files import, as "file: module"."""
    import ast

    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.name}: {n}" for n in names if n.startswith("moesim.sim")]
    return found


def test_placement_library_does_not_import_the_simulator():
    """Replica choice and capacity live with placement: no placement module imports
    ``moesim.sim`` (the ``moesim place`` command's --refine-scenario option, which runs the
    simulator, imports it lazily in the CLI layer, ``placement/commands.py``)."""
    from pathlib import Path

    import moesim.placement

    folder = Path(moesim.placement.__file__).parent
    assert _sim_imports(p for p in sorted(folder.glob("*.py")) if p.name != "commands.py") == []


def test_scenarios_take_no_defaults_from_the_simulator():
    from pathlib import Path

    import moesim.scenario

    assert _sim_imports([Path(moesim.scenario.__file__)]) == []
