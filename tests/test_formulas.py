"""Formulas pinned by hand-computed answers: each test fails if its formula changes."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.costs.model import cost_model_for
from moesim.costs.work import BenchShape
from moesim.dispatchers import get_dispatcher
from moesim.hardware import get_profile
from moesim.model.shapes import get_preset
from moesim.sim.allreduce import allreduce_time_us
from moesim.sim.cluster import ClusterSpec
from moesim.topology import build_topology
from tests.conftest import round_h100, routing_of


def test_ring_allreduce_by_hand():
    """16 H100 on 2 nodes, 1 GB: 2 x 15/16 of it over a NIC at 50 x 0.85 GB/s (42,500
    bytes/us) = 44,117.647 us, plus 2 x 15 hops of 5 us = 150 us."""
    hw = get_profile("H100-SXM")
    assert (hw.scale_out.bandwidth_gbps, hw.efficiency.scale_out) == (50, 0.85)
    assert hw.scale_out.latency_us == 5.0
    cluster = ClusterSpec(16, 8, build_topology(hw, 16, 8))
    assert allreduce_time_us(1e9, hw, cluster) == pytest.approx(
        2 * 15 / 16 * 1e9 / 42_500 + 150, rel=1e-12
    )
    assert allreduce_time_us(1e9, hw, cluster) == pytest.approx(44_267.647, abs=1e-3)


def test_grouped_ffn_is_one_call_of_all_experts():
    """A device's experts run as one grouped call: one launch plus, per expert with
    tokens, its share of a call of ``local_experts`` experts at that many tokens; 4 experts
    of 100 tokens cost the 4-expert call at 100 tokens, not four calls (four launches)."""
    hw = get_profile("H100-SXM")
    model = cost_model_for(hw)
    shape = BenchShape.from_model(get_preset("FLAME-MoE-290M"), local_experts=4)
    call = float(model.time_us("expert_ffn_grouped", shape, 100.0, "bf16")[0])
    got = model.grouped_ffn_us(np.array([[100.0, 100.0, 100.0, 100.0]]), shape, "bf16")
    assert got[0] == pytest.approx(call, rel=1e-12)
    # two experts idle: launch + 2 of the 4 shares
    half = model.grouped_ffn_us(np.array([[100.0, 0.0, 100.0, 0.0]]), shape, "bf16")
    launch = hw.kernel_launch_us
    assert half[0] == pytest.approx(launch + (call - launch) / 2, rel=1e-12)
    # an expert with a single token still pays its share of the call at one token
    one = float(model.time_us("expert_ffn_grouped", shape, 1.0, "bf16")[0])
    got1 = model.grouped_ffn_us(np.array([[1.0, 0.0, 0.0, 0.0]]), shape, "bf16")
    assert got1[0] == pytest.approx(launch + (one - launch) / 4, rel=1e-12)


def test_backward_is_twice_the_forward_and_causal_scores_halve_the_square():
    """Training's backward ops take 2 x their forward (experts, attention); causal prefill
    scores are 2 x T x T/2 x heads x (qk + v) FLOPs at the attention efficiency of the
    BF16 peak: FLAME-MoE-290M (16 heads of 64), 1,024 tokens: 2 x 1024 x 512 x 16 x 128
    = 2,147,483,648 FLOP / (989.4e6 x 0.7 FLOP/us) = 3.1006 us."""
    from moesim.costs.roofline import layer_costs
    from moesim.sim.program import build_program

    hw, shape = get_profile("H100-SXM"), get_preset("FLAME-MoE-290M")
    model = cost_model_for(hw)
    costs = layer_costs(
        shape, hw, tokens=1024, sequence_length=1024, mode="training", dtype="bf16",
        model=model,
    )  # fmt: skip
    assert shape.attention.num_heads == 16 and shape.head_dim == 64
    assert costs.scores_us == pytest.approx(2 * 1024 * 512 * 16 * 128 / (989.4e6 * 0.7))
    routed = routing_of([[10, 5], [5, 10]], np.full((2, 32), 3))
    layer = shape.moe_layer_indices()[0]
    prog = build_program(
        shape, hw, ClusterSpec(2, 2, build_topology(hw, 2, 2)), {layer: routed}, costs,
        mode="training", tokens_per_device=1024, sequence_length=1024, dtype="bf16",
        dispatcher=get_dispatcher("nccl-alltoallv"), model=model,
    )  # fmt: skip
    by = {op.phase: op.duration_us for op in prog if op.layer == layer}
    np.testing.assert_allclose(by["experts bwd"], 2 * by["experts"], rtol=1e-12)
    np.testing.assert_allclose(by["attention bwd"], 2 * by["attention"], rtol=1e-12)


def test_dispatch_waits_for_senders_and_combine_for_receivers():
    """Device 0 sends 192 copies to device 1, device 1 sends nothing to 0: in the dispatch
    device 1 waits for 0 (``senders[0, 1]``) and 0 for nobody; the combine goes back the
    other way, so there device 0 waits for 1 (``senders[1, 0]``) and 1 for nobody."""
    from moesim.costs.roofline import layer_costs
    from moesim.sim.program import build_program

    hw, shape = get_profile("H100-SXM"), get_preset("FLAME-MoE-290M")
    model = cost_model_for(hw)
    routed = routing_of([[64, 192], [0, 256]], np.full((2, 32), 8))
    costs = layer_costs(
        shape, hw, tokens=64, sequence_length=64, mode="prefill", dtype="bf16", model=model
    )
    layer = shape.moe_layer_indices()[0]
    prog = build_program(
        shape, hw, ClusterSpec(2, 2, build_topology(hw, 2, 2)), {layer: routed}, costs,
        mode="prefill", tokens_per_device=64, sequence_length=64, dtype="bf16",
        dispatcher=get_dispatcher("nccl-alltoallv"), model=model,
    )  # fmt: skip
    by = {op.phase: op for op in prog if op.layer == layer}
    assert by["dispatch"].senders.tolist() == [[True, True], [False, True]]
    assert by["combine"].senders.tolist() == [[True, False], [True, True]]
    assert by["unpermute"].name == f"L{layer} unpermute"
    # each device keeps its tokens: nobody waits for the other in either all-to-all
    local = routing_of([[256, 0], [0, 256]], np.full((2, 32), 8))
    prog = build_program(
        shape, hw, ClusterSpec(2, 2, build_topology(hw, 2, 2)), {layer: local}, costs,
        mode="prefill", tokens_per_device=64, sequence_length=64, dtype="bf16",
        dispatcher=get_dispatcher("nccl-alltoallv"), model=model,
    )  # fmt: skip
    by = {op.phase: op for op in prog if op.layer == layer}
    assert by["dispatch"].senders.tolist() == [[True, False], [False, True]]
    assert by["combine"].senders.tolist() == [[True, False], [False, True]]


def test_interleaved_allreduce_waits_for_every_microbatch():
    """Two microbatches of [c0, c1, all-reduce after c1] merge position by position into
    mb0 c0 (0), mb1 c0 (1), mb0 c1 (2), mb1 c1 (3); the all-reduce runs once, after 2 and 3."""
    from moesim.sim.engine import Compute
    from moesim.sim.program import interleave_microbatches

    def prog():
        z = np.zeros(2)
        return [
            Compute("c0", "other", z),
            Compute("c1", "other", z),
            Compute("ar", "allreduce", z, after=(1,)),
        ]

    merged = interleave_microbatches([prog(), prog()])
    assert [op.name for op in merged] == ["mb0 c0", "mb1 c0", "mb0 c1", "mb1 c1", "ar"]
    assert [op.after for op in merged] == [(), (), (0,), (1,), (2, 3)]


def test_count_level_draws_have_the_binomial_variance():
    """Counts of an expert of share pi among 1,000 tokens: mean 1000 pi, standard deviation
    sqrt(1000 pi (1 - pi)); pi = 0.5 -> 500 +- sqrt(250) = 15.811, pi = 0.2 -> 200 +-
    sqrt(160) = 12.649 (rounded normal draws above a mean of 10)."""
    from moesim.sim.counts import draw_counts

    pi = np.array([0.5, 0.2])
    got = draw_counts(pi, 1000, 4, 1, np.random.default_rng(7))
    z = np.random.default_rng(7).standard_normal((4, 2), dtype=np.float32)
    sd = np.array([15.811388, 12.649111])  # sqrt(250), sqrt(160)
    np.testing.assert_array_equal(got, np.rint(np.array([500.0, 200.0]) + sd * z))
    # many devices: the sample variance is 250 and 160 within 2 %
    many = draw_counts(pi, 1000, 20_000, 1, np.random.default_rng(1))
    np.testing.assert_allclose(many.var(axis=0), [250.0, 160.0], rtol=0.02)
    # with a rare expert (mean 1000 x 0.004 = 4, exact binomial draws) the other keeps
    # its normal law: variance 1000 x 0.3 x 0.7 = 210
    mixed = draw_counts(np.array([0.3, 0.004]), 1000, 20_000, 1, np.random.default_rng(2))
    np.testing.assert_allclose(mixed.var(axis=0), [210.0, 1000 * 0.004 * 0.996], rtol=0.03)


def test_remote_nodes_per_token_counts_tokens_with_every_expert_remote():
    """2 nodes x 2 devices, device d hosts expert d; token t starts on device t (top-2):
    token 0 (node 0) -> experts 2, 3, both on node 1: 1 remote node (every expert remote);
    token 1 (node 0) -> 0, 1: none; token 2 (node 1) -> 0, 2: node 0; token 3 (node 1)
    -> 1, 0: node 0 once. Mean (1 + 0 + 1 + 1) / 4 = 0.75; 2 + 0 + 1 + 2 = 5 assignments
    cross nodes; loads 3, 2, 2, 1: balance 3 / 2 = 1.5."""
    from moesim.placement import Placement
    from moesim.placement.metrics import score_window

    p = Placement(np.array([[[0], [1], [2], [3]]]), 4)
    ids = np.array([[[2, 3], [0, 1], [0, 2], [1, 0]]])  # (L=1, N=4, K=2)
    sc = score_window(p, ids, devices_per_node=2, tokens_per_batch=4)
    assert sc.remote_nodes.tolist() == [[0.75]]
    assert sc.inter_node_assignments.tolist() == [[5.0]]
    assert sc.balance.tolist() == [[1.5]]
    assert sc.summary(bytes_per_assignment=10.0) == {
        "balance_mean": 1.5,
        "balance_p99": 1.5,
        "balance_worst_layer": 1.5,
        "remote_nodes_per_token": 0.75,
        "inter_node_bytes_per_batch": 50.0,
        "dropped_share": 0.0,
    }
    # top-3, same placement: token 0 (node 0) -> experts 2, 3, 0: node 1 twice, 1 remote
    # node; token 1 (node 0) -> 1, 2, 3: 1; token 2 (node 1) -> 0, 1, 2: node 0 twice, 1;
    # token 3 (node 1) -> 3, 2, 0: 1. Mean 1.0; 2 + 2 + 2 + 1 = 7 assignments cross
    ids3 = np.array([[[2, 3, 0], [1, 2, 3], [0, 1, 2], [3, 2, 0]]])
    sc3 = score_window(p, ids3, devices_per_node=2, tokens_per_batch=4)
    assert sc3.remote_nodes.tolist() == [[1.0]] and sc3.inter_node_assignments.tolist() == [[7.0]]


def test_coactivation_lift_is_count_over_independent_expectation(tmp_path):
    """3 tokens, top-2: experts {0, 1}, {1, 0}, {2, 3}; counts 2, 2, 1, 1 over N = 3
    tokens. Pair (0, 1) seen twice; independent picks expect 2 x 2 / 3 = 4/3 of them: lift
    1.5. Pair (2, 3) once against 1 x 1 / 3: lift 3. Next layer ({1, 2}, {1, 3}, {0, 1}):
    12 (previous, next) pairs, row 0 holds 4 and column 1 holds 6, (0, 1) seen twice
    against 4 x 6 / 12 = 2: lift 1, P(1 | 0) = 2 / 4."""
    from moesim.traces.stats import trace_stats
    from moesim.traces.store import TraceWriter

    with TraceWriter(tmp_path / "t", num_experts=4, top_k=2, layers=[0, 1]) as w:
        w.write(0, np.array([[0, 1], [1, 0], [2, 3]]), token=np.arange(3))
        w.write(1, np.array([[1, 2], [1, 3], [0, 1]]), token=np.arange(3))
    first = trace_stats(tmp_path / "t", top=2)["layers"][0]
    assert first["top_coactivated_pairs"] == [
        {"experts": [0, 1], "count": 2, "p_given_first": 1.0, "lift": 1.5},
        {"experts": [2, 3], "count": 1, "p_given_first": 1.0, "lift": 3.0},
    ]
    assert first["top_next_layer_affinities"][0] == {
        "experts": [1, 1], "count": 2, "p_given_first": 0.5, "lift": 1.0
    }  # fmt: skip


def test_console_breakdown_shows_the_allreduce_in_training_only():
    """The breakdown line: each part's time and share of the step (1,000 us); the
    gradient all-reduce appears in training and not in prefill."""
    from moesim.report.summary import _breakdown

    parts = {"expert_us": 400.0, "dispatch_us": 150.0, "combine_us": 150.0,
             "allreduce_us": 250.0, "other_us": 50.0, "wait_us": 0.0}  # fmt: skip
    train = {"mode": "training", "step_time_us": 1000.0, "breakdown_us": parts}
    assert _breakdown(train) == (
        "expert compute 400.0 µs (40.0%), dispatch 150.0 µs (15.0%), combine 150.0 µs "
        "(15.0%), gradient all-reduce 250.0 µs (25.0%), other 50.0 µs (5.0%), "
        "waiting 0.0 µs (0.0%)"
    )
    prefill = {"mode": "prefill", "step_time_us": 1000.0, "breakdown_us": parts}
    assert _breakdown(prefill) == (
        "expert compute 400.0 µs (40.0%), dispatch 150.0 µs (15.0%), combine 150.0 µs "
        "(15.0%), other 50.0 µs (5.0%), waiting 0.0 µs (0.0%)"
    )
    hidden = {**train, "breakdown_us": {**parts, "overlapped_us": 100.0}}
    assert _breakdown(hidden).endswith(
        "waiting 0.0 µs (0.0%), overlapped (counted twice above) 100.0 µs (10.0%)"
    )


def test_ring_inside_one_domain_and_over_a_degraded_nic_by_hand():
    """8 H100 on one node ring over NVLink: 450 x 0.8 = 360 GB/s (360,000 bytes/us),
    3 us a hop: 1 GB -> 2 x 7/8 x 1e9 / 360,000 + 14 x 3 = 4,861.111 + 42 = 4,903.111 us.
    16 on 2 nodes with device 3's NIC at half speed: the ring runs at the slowest NIC,
    21,250 bytes/us: 2 x 15/16 x 1e9 / 21,250 + 30 x 5 = 88,235.294 + 150 = 88,385.294 us.
    One device or no bytes: nothing to reduce."""
    from dataclasses import replace

    from moesim.sim.allreduce import gradient_allreduce, ring_order

    hw = get_profile("H100-SXM")
    one_node = ClusterSpec(8, 8, build_topology(hw, 8, 8))
    assert allreduce_time_us(1e9, hw, one_node) == pytest.approx(4_903.111, abs=1e-3)
    two = build_topology(hw, 16, 8).degrade_nics({3: 0.5})
    assert allreduce_time_us(1e9, hw, ClusterSpec(16, 8, two)) == pytest.approx(
        88_385.294, abs=1e-3
    )
    assert allreduce_time_us(0.0, hw, one_node) == 0.0
    solo = ClusterSpec(1, 1, build_topology(hw, 1, 1))
    assert allreduce_time_us(1e9, hw, solo) == 0.0
    assert gradient_allreduce([(0, 1e6)], hw, solo) == []
    # the ring's order: forward in even nodes, backward in odd ones, a short last node too
    assert ring_order(6, 2).tolist() == [0, 1, 3, 2, 4, 5]
    assert ring_order(6, 4).tolist() == [0, 1, 2, 3, 5, 4]
    # flow tier: each device sends 2 x 7/8 of the 2e6 bytes to the next, and the ring's
    # other 13 hops of 3 us are added: 39 us
    (op,) = gradient_allreduce([(0, 1e6)], hw, replace(one_node, network="flow"))
    assert op.flows.nbytes.tolist() == [3.5e6] * 8
    assert op.flows.extra_latency_us == 39.0
    assert op.port_limited_us.tolist() == pytest.approx([2 * 7 / 8 * 2e6 / 360_000 + 42] * 8)
    assert (op.pass_, op.category, op.stream) == ("backward", "allreduce", "grad-allreduce")
    # a bucket closes at exactly 40 M parameters; groups without parameters add none
    cluster = ClusterSpec(16, 8, build_topology(hw, 16, 8))
    ops = gradient_allreduce([(1, 0.0), (2, 40e6), (3, 1e6), (4, 0.0)], hw, cluster)
    assert [o.after for o in ops] == [(2,), (4,)]
    assert gradient_allreduce([(1, 0.0), (2, 0.0)], hw, cluster) == []


def test_a2a_port_times_by_hand():
    """4 H100 in scale-up domains of 2 (NVLink 360,000 bytes/us, 3 us; NIC 42,500
    bytes/us, 5 us). Device 0 sends 3.6 MB to 1 (its domain: 10 us) and 0.85 MB to 2
    (across: 20 us), the slower tier sets its time: 5 + max(10, 20) = 25 us. Device 1
    receives 3.6 MB inside (10 us) and 7.2 MB from device 2 across (169.412 us): 174.412
    us, as device 2 sending them. Device 3 moves nothing: 0. Bytes that stay on a device
    (the diagonal) cost nothing. With device 2's NIC at half speed, its 7.2 MB take
    338.824 us."""
    from moesim.sim.network import a2a_times_us, block_diagonal_sums

    hw = get_profile("H100-SXM")
    m = np.array(
        [[100.0, 3.6e6, 8.5e5, 0.0], [0.0, 50.0, 0.0, 0.0], [0.0, 7.2e6, 0.0, 0.0], [0.0] * 4]
    )
    t = a2a_times_us(m, hw, 2)
    np.testing.assert_allclose(t.time_us, [25.0, 174.411765, 174.411765, 0.0], rtol=1e-8)
    assert t.sent_bytes.tolist() == [4.45e6, 0.0, 7.2e6, 0.0]
    assert t.recv_bytes.tolist() == [0.0, 10.8e6, 8.5e5, 0.0]
    assert t.cross_domain_bytes == 8.05e6
    assert t.uses_up.tolist() == [True, True, False, False]
    assert t.uses_out.tolist() == [True, True, True, False]
    half = a2a_times_us(m, hw, 2, out_scale=np.array([1.0, 1.0, 0.5, 1.0]))
    np.testing.assert_allclose(half.time_us[2], 5 + 7.2e6 / 21_250, rtol=1e-12)
    # a block that does not divide the devices: 3 devices in blocks of 2, diagonal counted
    m3 = np.array([[7, 1, 2], [3, 8, 4], [5, 6, 9]])
    sent, recv = block_diagonal_sums(m3, 2)
    assert (sent.tolist(), recv.tolist()) == ([8.0, 11.0, 9.0], [10.0, 9.0, 9.0])
    sent4, recv4 = block_diagonal_sums(np.arange(16).reshape(4, 4), 2)
    # rows 0-1 x cols 0-1: [0, 1; 4, 5]; rows 2-3 x cols 2-3: [10, 11; 14, 15]
    assert (sent4.tolist(), recv4.tolist()) == ([1.0, 9.0, 21.0, 29.0], [4.0, 6.0, 24.0, 26.0])


def test_count_level_inclusion_and_routing_by_hand():
    """Top-2 of 3 experts of popularity 0.2, 0.3, 0.5 drawn without replacement: expert 0
    is left out when it comes last, P = 0.3 x 0.5/0.7 + 0.5 x 0.3/0.5 = 0.514286, so it
    is in with 0.485714; expert 1: 1 - (0.2 x 0.5/0.8 + 0.5 x 0.2/0.5) = 0.675; expert
    2: 1 - (0.2 x 0.3/0.8 + 0.3 x 0.2/0.7) = 0.839286 (they sum to k = 2). Top-1: the
    popularity itself; k >= E: every expert."""
    from moesim.sim.counts import draw_counts, inclusion_probabilities, route_counts

    logp = np.log([0.2, 0.3, 0.5])
    np.testing.assert_allclose(
        inclusion_probabilities(logp, 2), [0.4857142857, 0.675, 0.8392857143], atol=1e-9
    )
    np.testing.assert_allclose(inclusion_probabilities(logp, 1), [0.2, 0.3, 0.5], atol=1e-12)
    assert inclusion_probabilities(np.zeros(3), 3).tolist() == [1.0, 1.0, 1.0]
    # small means (below 10): exact binomial draws, clipped to [0, tokens]
    small = draw_counts(np.array([0.004, 1.0]), 1000, 3, 1, np.random.default_rng(5))
    ref = np.random.default_rng(5).binomial(1000, np.array([0.004]), size=(3, 1))
    assert small[:, 0].tolist() == ref[:, 0].tolist() and small[:, 1].tolist() == [1000] * 3
    # 2 devices, expert e on device e; each device sends 30 to expert 0 and 10 to expert
    # 1: 60 reach slot 0, over its capacity of 40, which keeps 2/3 of every sender's
    # (20 each) and drops 10 of each; slot 1 keeps its 20. Dropless factor: 60 / (80 / 2)
    r = route_counts(
        np.array([[30, 10], [30, 10]]), np.array([[0], [1]]), np.array([[0, -1], [1, -1]]),
        np.array([1, 1]), devices_per_node=2, capacity=40,
    )  # fmt: skip
    assert r.dispatch.tolist() == [[20.0, 10.0], [20.0, 10.0]]
    assert (r.dropped.tolist(), r.device_load.tolist()) == ([10.0, 10.0], [40.0, 20.0])
    assert (r.routed_load.tolist(), r.expert_load.tolist()) == ([60.0, 20.0], [60, 20])
    assert (r.assignments, r.dropless_capacity_factor) == (80, 1.5)
    # two slots a device (experts 0, 1 on device 0; 2, 3 on device 1), no capacity:
    # device 0 sends 1 + 2 to itself and 3 + 4 to device 1; device 1 5 + 6 and 7 + 8
    r = route_counts(
        np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[0, 1], [2, 3]]),
        np.array([[0], [0], [1], [1]]), np.array([1, 1, 1, 1]), devices_per_node=2,
    )  # fmt: skip
    assert r.dispatch.tolist() == [[3.0, 7.0], [11.0, 15.0]]
    assert r.expert_tokens.tolist() == [[6.0, 8.0], [10.0, 12.0]]
    assert (r.device_load.tolist(), r.dropped.tolist()) == ([14.0, 22.0], [0.0, 0.0])
    assert r.dropless_capacity_factor == pytest.approx(12 / 9)  # busiest slot / 36 over 4
    # nothing routed: nothing dropped, factor 1
    r = route_counts(
        np.zeros((2, 2), dtype=np.int64), np.array([[0], [1]]), np.array([[0, -1], [1, -1]]),
        np.array([1, 1]), devices_per_node=2, capacity=0,
    )  # fmt: skip
    assert (r.dropless_capacity_factor, r.dropped.tolist()) == (1.0, [0.0, 0.0])


def test_planned_loads_replicas_and_moved_slots_by_hand():
    """2 devices x 2 slots, 3 experts. Layer 0: device 0 hosts 0, 1, device 1 hosts 2, 0
    (expert 0 twice); loads 40, 10, 30 split over replicas: 20, 10, 30, so device 0 plans
    20 + 10 = 30 and device 1 30 + 20 = 50, balance 50 / 40 = 1.25. Layer 1: device 0
    hosts 2, 1, device 1 hosts 0, 2; loads 8, 0, 12 -> 8, 0, 6 per replica: 6 and 14,
    balance 14 / 10 = 1.4; an idle layer: 1.0."""
    from moesim.placement import Placement
    from moesim.placement.metrics import (
        expert_loads,
        moved_share,
        moved_slots,
        planned_balance,
        planned_device_loads,
        replica_counts,
    )

    p = Placement(np.array([[[0, 1], [2, 0]], [[2, 1], [0, 2]]]), 3)
    assert replica_counts(p).tolist() == [[2, 1, 1], [1, 1, 2]]
    loads = np.array([[40.0, 10.0, 30.0], [8.0, 0.0, 12.0]])
    assert planned_device_loads(p, loads).tolist() == [[30.0, 50.0], [6.0, 14.0]]
    np.testing.assert_allclose(planned_balance(p, loads), [1.25, 1.4], rtol=1e-12)
    assert planned_balance(p, np.zeros((2, 3))).tolist() == [1.0, 1.0]
    # the same loads / 100: means of 0.4 and 0.1 give the same balance
    np.testing.assert_allclose(planned_balance(p, loads / 100), [1.25, 1.4], rtol=1e-12)
    ids = np.array([[[0, 1], [0, 2]], [[2, 1], [1, 0]]])  # (L, n, K)
    assert expert_loads(ids, 3).tolist() == [[2, 1, 1], [1, 2, 1]]
    # device 0 of layer 0 trades expert 0 for 2: one slot to fetch of 8; reordering is free
    new = Placement(np.array([[[1, 2], [0, 2]], [[1, 2], [0, 2]]]), 3)
    assert (moved_slots(p, new), moved_share(p, new)) == (1, 0.125)


def test_layer_parts_on_the_roofline_by_hand():
    """FLAME-MoE-290M, 1 token, prefill over 1,000, at 1e6 FLOP/us and 1e6 bytes/us.
    Attention: projections (1, 1024) @ (1024, 4096), 8,388,608 FLOP against 2 B x
    (1024 + 4,194,304 + 4096) = 8,398,848 bytes: (8.388608**4 + 8.398848**4) ** 0.25 =
    9.981886 us; causal scores 2 x 500 x 16 x 128 = 2,048,000 FLOP = 2.048 us; two norms
    reading and writing 1024 x 2 B each: 8,192 bytes = 0.008192 us; 4 launches: 20 us;
    32.038079 us. Dense FFN (d_ff 5,472, gated): each GEMM 11,206,656 FLOP against
    11,219,648 bytes, (11.206656**4 + 11.219648**4) ** 0.25 = 13.334767 us, x 3 + 3
    launches = 55.004301 us."""
    from moesim.costs.roofline import bytes_per_assignment, layer_costs, permute_us

    hw = round_h100(2.0, 2000.0)
    c = layer_costs(
        get_preset("FLAME-MoE-290M"), hw, tokens=1, sequence_length=1000, mode="prefill",
        dtype="bf16",
    )  # fmt: skip
    assert c.attention_us == pytest.approx(32.038079, abs=1e-6)
    assert c.dense_ffn_us == pytest.approx(55.004301, abs=1e-6)
    # permute of 1,000 copies of 1024 bf16: read and written, 4,096,000 bytes + a launch
    assert float(permute_us(1000, 1024, hw, "bf16")) == pytest.approx(9.096)
    # on the wire: 7168 x 2 B in bf16; fp8 7168 B plus an fp32 scale per 128: 7,392 B
    assert (bytes_per_assignment(7168, "bf16"), bytes_per_assignment(7168, "fp8")) == (
        14336.0,
        7392.0,
    )


def test_decode_reads_the_kv_cache_mla_and_grouped_by_hand():
    """1 token decoding over 1,000 cached at 1e9 FLOP/us and 1e6 bytes/us. DeepSeek-V3
    (MLA, 128 heads, q.k 128 + 64, v 128) caches the 512-wide latent and the 64-wide rope
    key: 1000 x 2 B x 576 = 1,152,000 bytes = 1.152 us against 2 x 1000 x 128 x 320 =
    81,920,000 FLOP = 0.08192 us: smooth max 1.152 x (1 + (0.08192 / 1.152)**4) ** 0.25 =
    1.1520074 us. Mixtral-8x7B (32 heads of 128, 8 KV heads) caches K and V of 8 heads:
    1000 x 2 B x 2 x 8 x 128 = 4,096,000 bytes = 4.096 us. Prefill scores are arithmetic
    alone: 2 x 500 x 128 x 320 = 40,960,000 FLOP = 0.04096 us; 2 x 500 x 32 x 256 =
    8,192,000 FLOP = 0.008192 us."""
    from moesim.costs.roofline import layer_costs

    hw = round_h100(2000.0, 2000.0)
    kw = dict(tokens=1, sequence_length=1000, dtype="bf16")
    ds, mx = get_preset("DeepSeek-V3"), get_preset("Mixtral-8x7B")
    assert layer_costs(ds, hw, mode="decode", **kw).scores_us == pytest.approx(
        1.152 * (1 + (0.08192 / 1.152) ** 4) ** 0.25, rel=1e-9
    )
    assert layer_costs(mx, hw, mode="decode", **kw).scores_us == pytest.approx(4.096, rel=1e-9)
    assert layer_costs(ds, hw, mode="prefill", **kw).scores_us == pytest.approx(0.04096)
    mixtral = layer_costs(mx, hw, mode="prefill", **kw)
    assert mixtral.scores_us == pytest.approx(0.008192)
    # no shared experts, no dense layers: nothing for either
    assert (mixtral.shared_us, mixtral.dense_ffn_us) == (0.0, 0.0)
    # attention kernels at their own efficiency (0.25 instead of the GEMMs' 0.5): 5e8
    # FLOP/us, DeepSeek-V3's 0.16384 us against 1.152 us of reads; prefill 0.08192 us
    slow = hw.model_copy(
        update={"efficiency": hw.efficiency.model_copy(update={"attention": 0.25})}
    )
    assert layer_costs(ds, slow, mode="decode", **kw).scores_us == pytest.approx(
        1.152 * (1 + (0.16384 / 1.152) ** 4) ** 0.25, rel=1e-9
    )
    assert layer_costs(ds, slow, mode="prefill", **kw).scores_us == pytest.approx(0.08192)


def test_router_and_memcpy_work_by_hand():
    """Mixtral-8x7B (d_model 4,096, 8 experts, top-2), 16 tokens in bf16 (2 bytes):
    router FLOPs 2 x 16 x 4096 x 8 + 5 x 16 x 8 = 1,049,216 (GEMM, then softmax/top-k);
    bytes moved 2 x (16 x 4096 + 8 x 4096 + 16 x 8) + 16 x 2 x (2 + 8) = 197,184, and
    touched 2 x (16 x 4096 + 8 x 4096 + 3 x 16 x 8) + 16 x 16 x 2 = 197,888; a memcpy of
    the 16 rows reads and writes 2 x 2 x 16 x 4096 = 262,144 bytes."""
    from moesim.costs.work import op_work

    s = BenchShape.from_model(get_preset("Mixtral-8x7B"), local_experts=1)
    assert (s.d_model, s.num_experts, s.top_k) == (4096, 8, 2)
    assert op_work("router", s, 16, "bf16") == pytest.approx((1_049_216, 197_184, 197_888))
    assert op_work("memcpy", s, 16, "bf16") == pytest.approx((0.0, 262_144, 262_144))
    # attention: projections linear in tokens, scores 2 x T x T/2 x heads x (qk + v), so
    # f(2) - 2 f(1) = (4 - 2) x 32 heads x (128 + 128) = 16,384 FLOPs
    assert (s.num_heads, s.head_dim, s.v_head_dim) == (32, 128, 128)
    f1, f2 = (op_work("attention", s, t, "bf16")[0] for t in (1, 2))
    assert f2 - 2 * f1 == pytest.approx(16_384)


def test_kv_cache_of_an_encoder_decoder_counts_both_stacks():
    """Switch-C-2048: 15 layers in each of 2 stacks, MHA 32 heads x 64: K and V are
    2 x 32 x 64 = 4,096 values per layer; bf16 2 B x 4,096 x 15 x 2 = 245,760 B per token."""
    from moesim.costs.memory import kv_cache_bytes_per_token
    from moesim.model.shapes import get_preset

    assert kv_cache_bytes_per_token(get_preset("Switch-C-2048"), "bf16") == 245_760
    assert kv_cache_bytes_per_token(get_preset("Switch-C-2048"), "fp8") == 122_880


def test_a_hot_device_is_hot_per_unit_of_its_own_nic():
    """Bytes 4, 4 | 2, 2 over NICs of 1, 2 | 1, 1: loads 4, 2 | 2, 2 per unit; node means
    3 and 2; at 1.1x only device 0 (4 > 3.3) is hot; device 1's 4 bytes ride a double NIC."""
    from moesim.sim.transfers import _hot

    hot = _hot(np.array([4.0, 4.0, 2.0, 2.0]), np.array([1.0, 2.0, 1.0, 1.0]), 2, 1.1)
    assert hot.tolist() == [True, False, False, False]


def test_flow_tier_exchange_times_refuse_to_rescale():
    """Only the analytic tier's times split into a port part and a latency part; a time
    with either part missing cannot be rescaled."""
    from moesim.sim.exchange import ExchangeTimes

    z = np.zeros(2)
    for port, lat in ((None, z), (z, None), (None, None)):
        with pytest.raises(ValueError, match="do not rescale"):
            ExchangeTimes(z, z, z, 0, port_us=port, latency_us=lat).scaled(2.0)
    # the analytic tier: port time x2 plus latency, where a device moves anything
    t = ExchangeTimes(z, np.array([1.0, 0.0]), np.array([0.0, 0.0]), 0,
                      port_us=np.array([3.0, 0.0]), latency_us=np.array([1.0, 1.0]))  # fmt: skip
    assert t.scaled(2.0).time_us.tolist() == [7.0, 0.0]


def test_a_layers_bytes_add_up_over_its_exchanges():
    """Two exchanges of one forward layer on 2 devices: sent 1, 2 then 3, 4 bytes, received
    5, 6 then 7, 8; the layer's row holds sent 1 + 3 = 4, 2 + 4 = 6 and received 5 + 7 =
    12, 6 + 8 = 14."""
    from moesim.sim.engine import Exchange, run_program
    from moesim.sim.metrics import metrics_frame

    ex = [
        Exchange(
            "a", "dispatch", np.ones(2), None, np.array([1.0, 2.0]), np.array([5.0, 6.0]), layer=0
        ),
        Exchange(
            "b", "combine", np.ones(2), None, np.array([3.0, 4.0]), np.array([7.0, 8.0]), layer=0
        ),
    ]
    rec = run_program(ex, 2)
    m = metrics_frame(ex, rec, {}, 0, 2)
    assert m["bytes_sent"].tolist() == [4.0, 6.0]
    assert m["bytes_recv"].tolist() == [12.0, 14.0]
