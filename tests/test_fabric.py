"""The network inside the event loop: golden timelines, in SimPy's style, computed by hand.

Four devices, two per node (0, 1 | 2, 3), every link at 1,000 bytes/µs (1 GB/s) and no
latency, so a 1,000-byte flow alone takes 1 µs. Device 0 reaches 2 over its own rail
(NIC 0 up, NIC 2 down); device 1 reaches 2 through the spine (NIC 1 up, leaf up, leaf
down, NIC 2 down): both end on NIC 2's downlink.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moesim.hardware import get_profile
from moesim.sim.engine import Compute, Exchange, run_program
from moesim.sim.exchange import exchange_times
from moesim.sim.fabric import Fabric
from moesim.sim.transfers import FlowSet
from moesim.topology import build_topology

D = 4


def _topo(**nic_scale):
    topo = build_topology(get_profile("H100-SXM"), D, 2)
    topo = replace(
        topo,
        capacity_gbps=np.ones(topo.num_links),
        latency_us=np.zeros(topo.num_links),
    )
    return topo.degrade_nics({int(k[1:]): v for k, v in nic_scale.items()})


def _flows(*pairs, nbytes=1000.0, **kw):
    src = np.array([p[0] for p in pairs])
    dst = np.array([p[1] for p in pairs])
    return FlowSet(src, dst, np.full(len(pairs), nbytes), **kw)


def _x(name, flows, **kw):
    return Exchange(name, "dispatch", np.zeros(D), None, flows=flows, **kw)


def _c(name, us, **kw):
    return Compute(name, "other", np.asarray(us, dtype=float), **kw)


def _span(rec, i):
    return [(float(s), float(e)) for s, e in zip(rec.start_us[i], rec.end_us[i], strict=True)]


def test_late_sender_flows_start_late_and_early_flows_run_alone_until_then():
    # device 1 computes 0.5 us before it sends; device 0 sends at once. 0 -> 2 runs alone
    # at 1,000 B/us for 0.5 us (500 B left), then shares NIC 2 with 1 -> 2 at 500 B/us:
    # 0 -> 2 ends at 0.5 + 500/500 = 1.5; 1 -> 2 has 500 B left then, alone: 2.0.
    prog = [_c("work", [0, 0.5, 0, 0]), _x("a2a", _flows((0, 2), (1, 2)))]
    rec = run_program(prog, D, Fabric(_topo()))
    assert _span(rec, 1) == [(0.0, 1.5), (0.5, 2.0), (0.5, 2.0), (0.0, 0.0)]
    assert rec.wait_us[1].tolist() == [0.0, 0.0, 0.5, 0.0]  # 2 waited for its late sender
    # what each device sends (released, last arrived) and receives: 2 receives from 0.0
    nan = float("nan")
    spans = rec.transfer_us[1].tolist()
    np.testing.assert_equal(
        spans,
        [[0.0, 1.5, nan, nan], [0.5, 2.0, nan, nan], [nan, nan, 0.0, 2.0], [nan] * 4],
    )
    assert np.isnan(rec.transfer_us[0]).all()  # compute
    # the old model released every flow when the last sender was ready: both at 500 B/us
    # from 0.5 on, ending at 2.5 (a device's part alone, isolated: 2.0 us after 0.5)
    alone = exchange_times(
        np.array([[0, 0, 1, 0], [0, 0, 1, 0], [0] * 4, [0] * 4]) * 1000.0,
        _topo(),
        get_profile("H100-SXM"),
        "flow",
        rel_tol=0.0,
    )
    assert alone.time_us.tolist() == [2.0, 2.0, 2.0, 0.0]


def test_two_microbatches_transfers_on_one_link_share_it():
    # mb0: 1 -> 2; mb1: 0 -> 2 (device 0 has nothing to send in mb0, so its mb1 transfer
    # starts at 0 too). Both cross NIC 2's downlink at 500 B/us and end at 2.0; each alone
    # would take 1 us.
    prog = [
        _x("mb0 dispatch", _flows((1, 2)), after=(), stream="comm"),
        _x("mb1 dispatch", _flows((0, 2)), after=(), stream="comm", microbatch=1),
    ]
    rec = run_program(prog, D, Fabric(_topo()))
    assert rec.end_us[0, 1] == rec.end_us[0, 2] == 2.0
    assert rec.end_us[1, 0] == 2.0
    # device 2 receives mb1's bytes while its comm stream is still on mb0's transfer: by the
    # time it gets to mb1 (2.0) they have all arrived
    assert _span(rec, 1)[2] == (2.0, 2.0)


def test_allreduce_overlapping_an_all_to_all_slows_both():
    # the all-to-all sends 0 -> 2; a ring all-reduce on its own stream sends 0->1, 1->2,
    # 2->3, 3->0 (1,000 B each). 1 -> 2 and 0 -> 2 share NIC 2's downlink: 500 B/us each,
    # both end at 2.0 (each alone: 1.0); the ring's other hops drain at 1.0.
    a2a = _x("a2a", _flows((0, 2)), after=(), stream="comm")
    ring = _flows((0, 1), (1, 2), (2, 3), (3, 0), barrier=True)
    ar = replace(_x("all-reduce", ring, after=(), stream="grad"), category="allreduce")
    rec = run_program([a2a, ar], D, Fabric(_topo()))
    assert rec.end_us[0].tolist() == [2.0, 0.0, 2.0, 0.0]
    # a ring ends on every device with its last hop
    assert rec.end_us[1].tolist() == [2.0, 2.0, 2.0, 2.0]
    alone = run_program([ar], D, Fabric(_topo()))
    assert alone.end_us[0].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_allreduce_barrier_releases_when_the_last_device_is_ready():
    ring = _flows((0, 1), (1, 2), (2, 3), (3, 0), barrier=True)
    prog = [_c("work", [0, 0, 3, 0]), _x("all-reduce", ring)]
    rec = run_program(prog, D, Fabric(_topo()))
    assert rec.end_us[1].tolist() == [4.0, 4.0, 4.0, 4.0]  # every hop from 3.0, 1 us each


def test_degraded_link_delays_exactly_the_flows_that_cross_it():
    # NIC 2 at a quarter: 250 B/us. 0 -> 2 and 0 -> 3 share NIC 0's uplink (1,000 B/us):
    # 0 -> 2 is held to 250 by NIC 2 and 0 -> 3 gets the other 750. 0 -> 3 ends at 4/3;
    # 0 -> 2 stays at 250 (its own bottleneck): 4.0. Healthy: both 500 B/us, 2.0.
    prog = [_x("a2a", _flows((0, 2), (0, 3)))]
    rec = run_program(prog, D, Fabric(_topo(n2=0.25)))
    assert rec.end_us[0].tolist() == pytest.approx([4.0, 0.0, 4.0, 4 / 3], rel=1e-12)
    healthy = run_program(prog, D, Fabric(_topo()))
    assert healthy.end_us[0].tolist() == [2.0, 0.0, 2.0, 2.0]


def test_degraded_link_delays_a_flow_only_while_it_crosses_it():
    # 1 -> 3 (via the spine, not NIC 2) is released first and runs alone; 0 -> 2 crosses
    # the degraded NIC 2 (250 B/us) from 1.0 on: it ends at 1.0 + 4.0; 1 -> 3 at 1.0
    prog = [_c("work", [1.0, 0, 0, 0]), _x("a2a", _flows((0, 2), (1, 3)))]
    rec = run_program(prog, D, Fabric(_topo(n2=0.25)))
    assert rec.end_us[1].tolist() == [5.0, 1.0, 5.0, 1.0]


def test_released_at_once_the_fabric_equals_one_isolated_exchange():
    # one exchange, every flow released at 0: the loop gives the isolated exchange's times
    hw = get_profile("H100-SXM")
    topo = build_topology(hw, 32, 8, oversubscription=2.0, nodes_per_leaf=2)
    rng = np.random.default_rng(4)
    m = rng.integers(0, 5, (32, 32)) * 4096.0
    want = exchange_times(m, topo, hw, "flow", rel_tol=0.0).time_us
    rec = run_program([_x32(FlowSet.from_matrix(m))], 32, Fabric(topo))
    np.testing.assert_allclose(rec.end_us[0], want, rtol=1e-9)


def _x32(fs):
    return Exchange("a2a", "dispatch", np.zeros(32), None, flows=fs)


# ----- the dense-gradient all-reduce, bucketed -----------------------------------------------
def test_gradient_buckets_fill_in_backward_order_and_reduce_once_full():
    from moesim.sim.allreduce import bucket_params, gradient_allreduce
    from moesim.sim.cluster import ClusterSpec

    hw = get_profile("H100-SXM")
    cluster = ClusterSpec(16, 8, build_topology(hw, 16, 8))
    assert bucket_params(16) == 40_000_000 and bucket_params(64) == 64_000_000
    # (op that finishes them, parameters): 30 M + 15 M fill the first 40 M bucket at op 9,
    # 50 M the second at op 12, and the last 1 M go once the backward pass is done (op 14)
    ops = gradient_allreduce([(5, 30e6), (9, 15e6), (12, 50e6), (14, 1e6)], hw, cluster)
    assert [op.after for op in ops] == [(9,), (12,), (14,)]
    assert {op.stream for op in ops} == {"grad-allreduce"}
    # ring over 16 devices, 2 nodes: 2 x 15/16 x bytes over the NIC (50 GB/s x 0.85), plus
    # 2 x 15 hops of 5 us; bf16 gradients
    for op, params in zip(ops, (45e6, 50e6, 1e6), strict=True):
        want = 2 * 15 / 16 * params * 2 / (50 * 0.85 * 1e3) + 30 * 5.0
        assert op.duration_us.tolist() == pytest.approx([want] * 16, rel=1e-12)
    # the flow tier: one flow per device to the next, released together
    flow = gradient_allreduce([(3, 1e6)], hw, replace(cluster, network="flow"))
    (fs,) = [op.flows for op in flow]
    # the ring crosses between nodes on one rail: 7 -> 15 (rail 7), 8 -> 0 (rail 0)
    assert fs.barrier and fs.src.tolist() == [*range(8), *range(15, 7, -1)]
    assert fs.dst.tolist() == [*range(1, 8), 15, *range(14, 7, -1), 0]
    assert fs.nbytes.tolist() == pytest.approx([2 * 15 / 16 * 2e6] * 16)


# ----- node granularity: aggregated flows ---------------------------------------------------
def test_node_links_pool_a_nodes_nics_and_a_groups_rail_leaves():
    from moesim.sim.transfers import node_links

    topo = build_topology(get_profile("H100-SXM"), 32, 8, oversubscription=2.0, nodes_per_leaf=2)
    nl = node_links(topo)
    # 8 NICs of 50 GB/s at 0.85 per node; per (group, spine) 8 rail leaves' downlinks of
    # 50 / 2 GB/s at 0.85
    assert nl.capacity_gbps[nl.in_port].tolist() == pytest.approx([340.0] * 4)
    assert nl.group_down.shape == (2, 2)
    assert nl.capacity_gbps[nl.group_down].ravel().tolist() == pytest.approx([170.0] * 4)


def test_bundles_join_a_senders_pairs_to_a_node_and_keep_hot_receivers_apart():
    from moesim.sim.transfers import bundle_traffic, node_links

    topo = build_topology(get_profile("H100-SXM"), 16, 8)
    nl = node_links(topo)
    m = np.zeros((16, 16))
    m[0, 8], m[0, 9], m[0, 10] = 100.0, 300.0, 150.0  # device 0 to node 1
    m[1, 8] = 50.0
    m[2, 11] = 2000.0  # device 11 receives 2,000 B: hot (node 1's mean is 325 B)
    m[0, 1] = 700.0  # inside node 0
    kept, b = bundle_traffic(m, topo, nl)
    assert sorted(zip(*np.nonzero(kept), strict=True)) == [(0, 1), (2, 11)]
    # 0 -> 8 stays on rail 0 (one leaf); 0 -> 9, 0 -> 10 and 1 -> 8 change rails: through
    # spine 1 (destination node 1 mod 32 spines), the sender's rail leaf up
    t = topo.tables
    assert b.src.tolist() == [0, 0, 1]
    assert b.nbytes.tolist() == [100.0, 450.0, 50.0] and b.weight.tolist() == [1, 2, 1]
    paths = [b.routes.path(i) for i in range(3)]
    assert paths[0] == [t["nic_up"][0], nl.in_port[1]]
    assert paths[1] == [t["nic_up"][0], t["leaf_up"][0, 1], nl.group_down[0, 1], nl.in_port[1]]
    assert paths[2] == [t["nic_up"][1], t["leaf_up"][1, 1], nl.group_down[0, 1], nl.in_port[1]]
    # the sender is busy to the end; of 0's spine bundle (150 + 300 B) the receiver of 150 B
    # is done when 2 x 150 of the 450 B have gone
    dev, frac = b.touched(np.array([1]))
    assert dev.tolist() == [0, 9, 10] and frac.tolist() == pytest.approx([1.0, 1.0, 2 / 3])


def test_a_bundles_members_end_as_equal_shares_would_end_them():
    from moesim.sim.transfers import _member_fractions

    # bundle 0 holds members of 1, 3 (and bundle 1 one of 5) bytes: at equal rates the
    # 1-byte member ends when 2 of the 4 bytes have gone (1/2 of the bundle's time); the
    # 3-byte one with the last; with sizes 2, 2, 4 the first two end at 6/8
    frac = _member_fractions(np.array([0, 1, 0]), np.array([3.0, 5.0, 1.0]), 2)
    assert frac.tolist() == [1.0, 1.0, 0.5]
    frac = _member_fractions(np.array([0, 0, 0]), np.array([2.0, 4.0, 2.0]), 1)
    assert frac.tolist() == [0.75, 1.0, 0.75]


def test_node_bundles_equal_device_flows_when_the_node_port_binds_like_the_nics():
    # every device of node 0 sends 1,000 B to each device of node 1 (links 1 GB/s): each
    # NIC moves 8,000 B at 1,000 B/us, 8 us, whether 64 device flows or 16 weighted bundles
    # (per sender, one on its rail and one through the spine) on node 1's pooled port
    from moesim.sim.cluster import ClusterSpec

    topo = build_topology(get_profile("H100-SXM"), 16, 8)
    topo = replace(topo, capacity_gbps=np.ones(topo.num_links), latency_us=np.zeros(topo.num_links))
    m = np.zeros((16, 16))
    m[:8, 8:] = 1000.0
    ends = {}
    for gran in ("device", "node"):
        cl = ClusterSpec(16, 8, topo, network="flow", flow_rel_tol=0.0, granularity=gran)
        fs = cl.flows(m)
        prog = [Exchange("a2a", "dispatch", np.zeros(16), None, flows=fs)]
        rec = run_program(prog, 16, cl.fabric())
        ends[gran] = rec.end_us[0]
        # node 0 sends from 0 to 8 us, node 1 receives from 0 to 8 us
        want = [[0.0, 8.0, np.nan, np.nan]] * 8 + [[np.nan, np.nan, 0.0, 8.0]] * 8
        np.testing.assert_equal(rec.transfer_us[0].tolist(), want)
    assert ends["node"].tolist() == ends["device"].tolist() == [8.0] * 16


def test_auto_granularity_keeps_device_flows_while_affordable():
    from moesim.sim.cluster import resolve_granularity

    hw = get_profile("H100-SXM")
    assert resolve_granularity("auto", build_topology(hw, 256, 8)) == "device"
    assert resolve_granularity("auto", build_topology(hw, 264, 8)) == "node"
    assert resolve_granularity("node", build_topology(hw, 8, 8)) == "device"  # one domain
    tpu = build_topology(get_profile("TPU-v5p"), 64, 4)
    assert resolve_granularity("node", tpu) == "device"  # tori keep device flows


def test_a_device_waits_for_those_it_receives_from_not_those_it_sends_to():
    # device 0 sends to device 1, which sends nothing back: 1's dispatch needs 0 ready,
    # 0's needs nobody (closed form and flow tier alike)
    from moesim.costs.model import cost_model_for
    from moesim.costs.roofline import layer_costs
    from moesim.model.shapes import get_preset
    from moesim.sim.cluster import ClusterSpec
    from moesim.sim.program import build_program
    from moesim.sim.routing import LayerRouting

    hw, shape = get_profile("H100-SXM"), get_preset("FLAME-MoE-290M")
    copies = np.array([[64, 192], [0, 256]])
    routed = LayerRouting(
        device_load=np.array([64, 448]),
        expert_tokens=np.full((2, 32), 8),
        dispatch=copies,
        copies=copies,
        dropped=np.zeros(2),
        rerouted=0,
        assignments=512,
    )
    costs = layer_costs(
        shape, hw, tokens=64, sequence_length=64, mode="prefill", dtype="bf16",
        model=cost_model_for(hw),
    )  # fmt: skip
    for tier in ("analytic", "flow"):
        cluster = ClusterSpec(2, 2, build_topology(hw, 2, 2), network=tier)
        layer = shape.moe_layer_indices()[0]
        prog = build_program(
            shape, hw, cluster, {layer: routed}, costs, mode="prefill", tokens_per_device=64,
            sequence_length=64, dtype="bf16", dispatch_dtype="bf16",
        )  # fmt: skip
        (disp,) = [op for op in prog if op.name == f"L{layer} dispatch"]
        assert disp.senders.tolist() == [[True, True], [False, True]]
        if tier == "flow":
            assert (disp.flows.src.tolist(), disp.flows.dst.tolist()) == ([0], [1])
