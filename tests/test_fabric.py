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
from tests.conftest import routing_of

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


def test_a_flow_drained_as_another_is_released_is_delivered_as_itself(monkeypatch):
    # 0 -> 2 drains at 1 us, when 1 -> 3 of another op is released; the release compacts
    # the pool (here at once), which must not hand back the new flow for the drained one
    monkeypatch.setattr(Fabric, "compact_min", 0)
    fab = Fabric(_topo())
    # (its last 1e-7 B leave with the release: a tie, delivered on the release's event)
    fab.release(0.0, 0, np.array([0]), np.array([2]), np.array([1000.0 + 1e-7]))
    fab.release(1.0, 1, np.array([1]), np.array([3]), np.array([1000.0]))
    seen = []
    while fab.busy:
        g = fab.step()
        assert g is not None
        seen += zip(g.op.tolist(), g.src.tolist(), g.dst.tolist(), g.time_us.tolist(), strict=True)
    assert seen == [(0, 0, 2, 1.0), (1, 1, 3, 2.0)]


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
    # 8 NICs of 50 GB/s at 0.85 per node, each way; per (group, spine) 8 rail leaves' links
    # of 50 / 2 GB/s at 0.85, each way
    assert nl.capacity_gbps[nl.out_port].tolist() == pytest.approx([340.0] * 4)
    assert nl.capacity_gbps[nl.in_port].tolist() == pytest.approx([340.0] * 4)
    assert nl.group_up.shape == nl.group_down.shape == (2, 2)
    assert nl.capacity_gbps[nl.group_up].ravel().tolist() == pytest.approx([170.0] * 4)
    assert nl.capacity_gbps[nl.group_down].ravel().tolist() == pytest.approx([170.0] * 4)


def _two_nodes():
    m = np.zeros((16, 16))
    m[0, 8], m[0, 9], m[0, 10] = 100.0, 300.0, 150.0  # device 0 to node 1
    m[1, 8] = 50.0
    m[0, 1] = 700.0  # inside node 0
    return m


def test_node_bundles_join_a_node_pairs_traffic_per_path():
    from moesim.sim.transfers import node_links, node_traffic

    topo = build_topology(get_profile("H100-SXM"), 16, 8)
    nl = node_links(topo)
    kept, b = node_traffic(_two_nodes(), topo, nl, hot=10.0)  # no device hot at 10x
    assert sorted(zip(*np.nonzero(kept), strict=True)) == [(0, 1)]
    # 0 -> 8 stays on rail 0 (one leaf): the direct bundle; 0 -> 9, 0 -> 10 and 1 -> 8
    # change rails: the spine bundle, through spine 1 (destination node 1 mod 32 spines)
    assert b.group.tolist() == [0, 0] and b.group_size == 8  # both wait for all of node 0
    assert b.nbytes.tolist() == [100.0, 500.0] and b.weight.tolist() == [1, 3]
    assert b.routes.path(0) == [nl.out_port[0], nl.in_port[1]]
    assert b.routes.path(1) == [
        nl.out_port[0],
        nl.group_up[0, 1],
        nl.group_down[0, 1],
        nl.in_port[1],
    ]
    # members of 50, 150, 300 B at equal rates end when 150, 350 and 500 of the 500 B have
    # gone: a device is done at its last member's share
    dev, frac, out = b.touched(np.array([1]))
    assert dev.tolist() == [0, 1, 8, 9, 10] and out.tolist() == [True, True, False, False, False]
    assert frac.tolist() == pytest.approx([1.0, 0.3, 0.3, 1.0, 0.7])


def test_a_hot_device_keeps_its_own_nic():
    from moesim.sim.transfers import node_links, node_traffic

    topo = build_topology(get_profile("H100-SXM"), 16, 8)
    nl, t = node_links(topo), topo.tables
    m = _two_nodes()
    m[2, 11] = 2000.0
    # at 1.1 x the node's mean (325 B) device 11 (2,000 B in) is a hot receiver: 2 -> 11
    # stays a device flow; then device 0 (550 B out of 550 / 8 per device) is a hot
    # sender: its pairs start on its own NIC (and, through the spine, its rail leaf's
    # uplink); 1 -> 8 is a node bundle
    kept, b = node_traffic(m, topo, nl)
    assert sorted(zip(*np.nonzero(kept), strict=True)) == [(0, 1), (2, 11)]
    assert b.nbytes.tolist() == [100.0, 50.0, 450.0] and b.weight.tolist() == [1, 1, 2]
    assert b.routes.path(0) == [t["nic_up"][0], nl.in_port[1]]
    assert b.routes.path(1) == [
        nl.out_port[0],
        nl.group_up[0, 1],
        nl.group_down[0, 1],
        nl.in_port[1],
    ]
    assert b.routes.path(2) == [
        t["nic_up"][0],
        t["leaf_up"][0, 1],
        nl.group_down[0, 1],
        nl.in_port[1],
    ]
    dev, frac, out = b.touched(np.array([2]))
    assert dev.tolist() == [0, 9, 10] and out.tolist() == [True, False, False]
    assert frac.tolist() == pytest.approx([1.0, 1.0, 2 / 3])


def test_rail_bundles_take_deepeps_path_through_the_senders_rail_and_forward_inside_the_node():
    from moesim.sim.transfers import rail_traffic

    topo = build_topology(get_profile("H100-SXM"), 16, 8)
    t = topo.tables
    m = _two_nodes()
    m[0, 10] = 0.0
    # dispatch: 0's 400 B for node 1 go to 8 (rail 0), which forwards 300 B to 9; 1's 50 B
    # go to 9 (rail 1), which forwards them to 8
    kept, b = rail_traffic(m, topo)
    assert {(int(i), int(j)): kept[i, j] for i, j in zip(*np.nonzero(kept), strict=True)} == {
        (0, 1): 700.0,
        (8, 9): 300.0,
        (9, 8): 50.0,
    }
    assert b.group.tolist() == [0, 1] and b.group_size == 1
    assert b.nbytes.tolist() == [400.0, 50.0] and b.weight.tolist() == [2, 1]
    assert b.routes.path(0) == [t["nic_up"][0], t["nic_down"][8]]
    assert b.routes.path(1) == [t["nic_up"][1], t["nic_down"][9]]
    # the relay is busy to the bundle's end; receiver 9 of 300 B too, as is each sender
    dev, frac, out = b.touched(np.array([0, 1]))
    assert dev.tolist() == [0, 8, 9, 1, 8, 9] and out.tolist() == [True, False, False] * 2
    assert frac.tolist() == [1.0] * 6
    # combine: the other way round, node 1's devices hand 0's bytes to 8 (0's rail) over
    # the scale-up fabric, which sends them over rail 0; the bundle waits for all of node 1
    kept, b = rail_traffic(m.T, topo, combine=True)
    assert {(int(i), int(j)): kept[i, j] for i, j in zip(*np.nonzero(kept), strict=True)} == {
        (1, 0): 700.0,
        (9, 8): 300.0,
        (8, 9): 50.0,
    }
    assert b.group.tolist() == [1, 1] and b.group_size == 8
    assert b.routes.path(0) == [t["nic_up"][8], t["nic_down"][0]]
    assert b.routes.path(1) == [t["nic_up"][9], t["nic_down"][1]]
    dev, frac, out = b.touched(np.array([0]))
    assert dev.tolist() == [8, 9, 0] and out.tolist() == [True, True, False]
    # 8 sends 100 B of its own, done at (2 x 100) / 400 of the way, but relays to the end
    assert frac.tolist() == [1.0, 1.0, 1.0]


def test_a_bundles_members_end_as_equal_shares_would_end_them():
    from moesim.sim.transfers import _block_fractions

    # bundle 0 holds members of 3 and 1 bytes (and bundle 1 one of 5): at equal rates the
    # 1-byte member ends when 2 of the 4 bytes have gone (1/2 of the bundle's time), the
    # 3-byte one with the last; with sizes 2, 4, 2 the two of 2 end at 6/8
    frac = _block_fractions(np.array([[3.0, 0.0, 1.0], [5.0, 0.0, 0.0]]))
    assert frac.tolist() == [[1.0, 0.0, 0.5], [1.0, 0.0, 0.0]]
    assert _block_fractions(np.array([[2.0, 4.0, 2.0]])).tolist() == [[0.75, 1.0, 0.75]]


def test_a_node_bundle_goes_out_when_the_nodes_last_device_is_ready():
    # 0 -> 2 and 1 -> 3, 1,000 B each on one rail; device 1 computes 2 us first. Device
    # flows (and rail bundles, one per sender): 0 -> 2 over 0 to 1 us, 1 -> 3 over 2 to 3.
    # Node bundles: one of 2,000 B, weight 2, at the pooled 2,000 B/us, released at 2 us
    # when node 0's last device is ready: every device ends at 3 us
    from moesim.sim.cluster import ClusterSpec

    m = np.zeros((D, D))
    m[0, 2] = m[1, 3] = 1000.0
    want = {"device": [1.0, 3.0, 1.0, 3.0], "rail": [1.0, 3.0, 1.0, 3.0], "node": [3.0] * 4}
    for gran, ends in want.items():
        cl = ClusterSpec(D, 2, _topo(), network="flow", flow_rel_tol=0.0, granularity=gran)
        prog = [_c("work", [0, 2, 0, 0]), _x("a2a", cl.flows(m))]
        rec = run_program(prog, D, cl.fabric())
        assert rec.end_us[1].tolist() == ends, gran
        # flows counted: 2 device flows, 2 rail bundles (one per sender), 1 node bundle
        assert rec.flows == {"device": 2, "rail": 2, "node": 1}[gran]
        assert rec.start_us[1].tolist() == ([0.0, 2.0, 0.0, 2.0] if gran != "node" else [2.0] * 4)


def test_bundles_equal_device_flows_when_the_pooled_ports_bind_like_the_nics():
    # every device of node 0 sends 1,000 B to each device of node 1 (links 1 GB/s): each
    # NIC moves 8,000 B at 1,000 B/us, 8 us, whether 64 device flows, 8 rail bundles (one
    # per sender to its rail's relay, which forwards 7,000 B at 1,000 B/us meanwhile) or 2
    # node bundles (weights 8 on one leaf and 56 through the spine, sharing node 0's
    # 8,000 B/us out port 1:7) onto node 1's pooled port
    from moesim.sim.cluster import ClusterSpec

    topo = build_topology(get_profile("H100-SXM"), 16, 8)
    topo = replace(topo, capacity_gbps=np.ones(topo.num_links), latency_us=np.zeros(topo.num_links))
    m = np.zeros((16, 16))
    m[:8, 8:] = 1000.0
    ends = {}
    for gran in ("device", "rail", "node"):
        cl = ClusterSpec(16, 8, topo, network="flow", flow_rel_tol=0.0, granularity=gran)
        fs = cl.flows(m)
        prog = [Exchange("a2a", "dispatch", np.zeros(16), None, flows=fs)]
        rec = run_program(prog, 16, cl.fabric())
        ends[gran] = rec.end_us[0]
        # node 0 sends from 0 to 8 us, node 1 receives from 0 to 8 us (rail: node 1's
        # relays also send, forwarding, from 0 to 7 us)
        fwd = [0.0, 7.0] if gran == "rail" else [np.nan, np.nan]
        want = [[0.0, 8.0, np.nan, np.nan]] * 8 + [[*fwd, 0.0, 8.0]] * 8
        np.testing.assert_equal(rec.transfer_us[0].tolist(), want)
    assert ends["node"].tolist() == ends["rail"].tolist() == ends["device"].tolist() == [8.0] * 16


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
    from moesim.dispatchers import get_dispatcher
    from moesim.model.shapes import get_preset
    from moesim.sim.cluster import ClusterSpec
    from moesim.sim.program import build_program

    hw, shape = get_profile("H100-SXM"), get_preset("FLAME-MoE-290M")
    routed = routing_of([[64, 192], [0, 256]], np.full((2, 32), 8))
    costs = layer_costs(
        shape, hw, tokens=64, sequence_length=64, mode="prefill", dtype="bf16",
        model=cost_model_for(hw),
    )  # fmt: skip
    for tier in ("analytic", "flow"):
        cluster = ClusterSpec(2, 2, build_topology(hw, 2, 2), network=tier)
        layer = shape.moe_layer_indices()[0]
        prog = build_program(
            shape, hw, cluster, {layer: routed}, costs, mode="prefill", tokens_per_device=64,
            sequence_length=64, dtype="bf16", dispatcher=get_dispatcher("nccl-alltoallv"),
            model=cost_model_for(hw),
        )  # fmt: skip
        (disp,) = [op for op in prog if op.name == f"L{layer} dispatch"]
        assert disp.senders.tolist() == [[True, True], [False, True]]
        if tier == "flow":
            assert (disp.flows.src.tolist(), disp.flows.dst.tolist()) == ([0], [1])


def test_release_times_round_up_to_the_grid_of_rel_tol():
    """With the fabric's ``rel_tol`` 0.5 and every device's port-limited time 1 µs, flows
    are released on a grid of 0.5 x 1 = 0.5 µs: device 1, ready at 0.7, releases 1 -> 3
    at ceil(0.7 / 0.5) x 0.5 = 1.0, which ends alone 1 µs later, at 2.0; device 0, ready
    at 0, releases 0 -> 2 at once (its own rail), ending at 1.0."""
    prog = [
        _c("work", [0.0, 0.7, 0.0, 0.0]),
        _x("dispatch", _flows((0, 2), (1, 3)), port_limited_us=np.ones(D)),
    ]
    rec = run_program(prog, D, Fabric(_topo(), rel_tol=0.5))
    assert rec.transfer_us is not None
    assert rec.transfer_us[1, 1, :2].tolist() == [1.0, 2.0]
    assert rec.transfer_us[1, 0, :2].tolist() == [0.0, 1.0]


def test_reversed_flows_swap_ends_and_keep_their_options():
    fs = FlowSet(np.array([0, 1]), np.array([2, 3]), np.array([10.0, 20.0]), 1.0, True, 0.5)
    back = fs.reversed(3.0)
    assert (back.src.tolist(), back.dst.tolist()) == ([2, 3], [0, 1])
    assert (back.scale, back.barrier, back.extra_latency_us) == (3.0, True, 0.5)
    plain = FlowSet(np.array([0]), np.array([2]), np.array([10.0])).reversed(2.0)
    assert (plain.scale, plain.barrier, plain.extra_latency_us) == (2.0, False, 0.0)


def test_a_one_hop_flow_pays_its_links_latency():
    """On a torus, neighbours 0 and 1 share one direct link: 1,000 B at 1,000 B/us take
    1 us plus the link's 2 us latency, 3 us in all."""
    topo = build_topology(get_profile("TPU-v6e"), 16, 8)
    assert topo.routes(np.array([0]), np.array([1])).hops().tolist() == [1]
    topo = replace(
        topo, capacity_gbps=np.ones(topo.num_links), latency_us=np.full(topo.num_links, 2.0)
    )
    flows = FlowSet(np.array([0]), np.array([1]), np.array([1000.0]))
    prog = [Exchange("a2a", "dispatch", np.zeros(16), None, flows=flows)]
    rec = run_program(prog, 16, Fabric(topo))
    assert rec.end_us[0, 0] == pytest.approx(3.0, rel=1e-12)
    assert rec.end_us[0, 1] == pytest.approx(3.0, rel=1e-12)
