"""Topologies, the flow tier and its agreement with the analytic tier (issue 5)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim.hardware import get_profile
from moesim.sim.exchange import exchange_times
from moesim.sim.flows import maxmin_rates, simulate_flows
from moesim.sim.network import port_times_us
from moesim.topology import build_topology
from moesim.topology.build import Routes, torus_dims


def _edges(topo):
    return {i: (a, b) for a, b, i in topo.graph.edges(data="index")}


@pytest.mark.parametrize(
    ("hw", "devices", "per_node"),
    [
        ("H100-SXM", 16, 8),
        ("H100-SXM", 512, 8),
        ("GB200-NVL72", 144, 4),
        ("MI300X", 16, 8),
        ("TPU-v5p", 64, 4),
        ("TPU-v6e", 16, 8),
    ],
)
def test_every_route_is_a_path_in_the_graph(hw, devices, per_node):
    topo = build_topology(get_profile(hw), devices, per_node)
    src, dst = np.nonzero(~np.eye(devices, dtype=bool))
    routes = topo.routes(src, dst)
    edges = _edges(topo)
    for f in range(0, routes.num_flows, max(1, routes.num_flows // 300)):
        hops = [edges[link] for link in routes.path(f)]
        assert hops[0][0] == ("dev", src[f]) and hops[-1][1] == ("dev", dst[f])
        assert all(a[1] == b[0] for a, b in itertools.pairwise(hops))
    for _, _, data in topo.graph.edges(data=True):
        assert data["bandwidth_gbps"] > 0 and data["latency_us"] >= 0


def test_torus_dimension_order_routing():
    topo = build_topology(get_profile("TPU-v6e"), 16, 8, dims=(4, 4))
    edges = _edges(topo)
    # device = x + 4 y ; 0 -> 10 is (0,0) -> (2,2): two hops +x, then two hops +y (ties go +)
    path = [edges[i] for i in topo.routes(np.array([0]), np.array([10])).path(0)]
    assert [a[1] for a, _ in path] + [path[-1][1][1]] == [0, 1, 2, 6, 10]
    # 0 -> 3 wraps around: one hop -x
    assert [
        e[1][1] for e in (edges[i] for i in topo.routes(np.array([0]), np.array([3])).path(0))
    ] == [3]
    assert torus_dims(64, 3) == (4, 4, 4)


def test_maxmin_hand_case():
    # links: 0 (1 GB/s), 1 (2 GB/s); flows: A on 0, B on 0+1, C on 1
    from scipy import sparse

    inc = sparse.csr_matrix(np.array([[1, 1, 0], [0, 1, 1]], dtype=float))
    rates = maxmin_rates(inc, np.ones(3), np.array([1.0, 2.0]), np.ones(3, bool))
    assert rates.tolist() == pytest.approx([0.5, 0.5, 1.5])
    res = simulate_flows(
        Routes(np.array([0, 1, 3, 4]), np.array([0, 0, 1, 1])),
        np.full(3, 1000.0),
        np.array([1.0, 2.0]),
        np.zeros(2),
    )
    # C drains 1000 B at 1500 B/us; then A and B share link 0 at 500 B/us each
    assert res.finish_us.tolist() == pytest.approx([2.0, 2.0, 2 / 3])


@pytest.mark.parametrize(
    ("hw", "devices", "per_node"),
    [
        ("H100-SXM", 8, 8),
        ("H100-SXM", 16, 8),
        ("H100-SXM", 64, 8),
        ("H100-SXM", 512, 8),
        ("H800", 32, 8),
        ("GB200-NVL72", 144, 4),
        ("MI300X", 16, 8),
        ("B200", 16, 8),
    ],
)
def test_tiers_agree_on_non_blocking_fabrics(hw, devices, per_node):
    profile = get_profile(hw)
    topo = build_topology(profile, devices, per_node)
    m = np.full((devices, devices), 3.5e5)
    a = exchange_times(m, topo, profile, "analytic")
    f = exchange_times(m, topo, profile, "flow")
    np.testing.assert_allclose(f.time_us, a.time_us, rtol=1e-6)


def test_uniform_closed_form_two_nodes():
    hw = get_profile("H100-SXM")
    topo = build_topology(hw, 16, 8)
    b = 1e6
    f = exchange_times(np.full((16, 16), b), topo, hw, "flow")
    up = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up * 1e3
    out = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
    expected = max(7 * b / up + hw.scale_up.latency_us, 8 * b / out + hw.scale_out.latency_us)
    assert f.time_us == pytest.approx(np.full(16, expected))


def test_oversubscribed_spine_shows_contention():
    hw = get_profile("H100-SXM")
    # one node per leaf: all traffic between the two nodes crosses the spine, whose
    # uplinks carry NIC/4
    topo = build_topology(hw, 16, 8, nodes_per_leaf=1, oversubscription=4)
    b = 2e6
    m = np.zeros((16, 16))
    m[np.arange(8), np.arange(8) + 8] = b  # each GPU of node 0 to its rail peer in node 1
    nic = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
    a = exchange_times(m, topo, hw, "analytic")
    f = exchange_times(m, topo, hw, "flow")
    assert a.time_us[0] == pytest.approx(b / nic + hw.scale_out.latency_us)
    assert f.time_us[0] == pytest.approx(b / (nic / 4) + hw.scale_out.latency_us)


def test_torus_link_sharing_shows_contention():
    hw = get_profile("TPU-v6e")
    topo = build_topology(hw, 16, 8, dims=(4, 4))
    link = hw.scale_up.bandwidth_gbps / 4 * hw.efficiency.scale_up * 1e3  # 4 links per chip
    b = 1e6
    m = np.zeros((16, 16))
    m[0, 2] = b  # 0 -> 1 -> 2
    m[1, 2] = b  # 1 -> 2, sharing link 1->2 with the first flow
    f = exchange_times(m, topo, hw, "flow")
    lat = hw.scale_up.latency_us
    assert f.time_us[1] == pytest.approx(b / (link / 2) + lat)
    assert f.time_us[0] == pytest.approx(b / (link / 2) + 2 * lat)
    a = exchange_times(m, topo, hw, "analytic")
    assert a.time_us[1] < f.time_us[1]  # the port model cannot see the shared link


@pytest.mark.parametrize(
    ("hw", "devices", "per_node", "over"),
    [
        ("H100-SXM", 32, 8, 1.0),
        ("H800", 24, 8, 2.0),
        ("MI300X", 16, 8, 1.0),
        ("GB200-NVL72", 144, 4, 1.0),
    ],
)
def test_latency_by_tier_equals_the_longest_path(hw, devices, per_node, over):
    """Switched fabrics price latency by the tiers a device uses; that must be the latency
    of its longest path, which the analytic tier used to compute flow by flow."""
    profile = get_profile(hw)
    topo = build_topology(profile, devices, per_node, oversubscription=over)
    rng = np.random.default_rng(devices)
    m = rng.random((devices, devices)) * (rng.random((devices, devices)) < 0.2) * 1e6
    m[3] = 0.0  # a device that only receives
    m[:, 5] = 0.0  # and one that only sends
    got = exchange_times(m, topo, profile, "analytic")
    np.fill_diagonal(m, 0.0)
    src, dst = np.nonzero(m)
    r = topo.routes(src, dst)
    lat = np.add.reduceat(topo.latency_us[r.links], r.indptr[:-1])
    want = np.zeros(devices)
    np.maximum.at(want, src, lat)
    np.maximum.at(want, dst, lat)
    assert topo.tier_latency_us() is not None
    p = port_times_us(m, profile, topo.domain_size)
    np.testing.assert_allclose(
        got.time_us, np.where(p.sent_bytes + p.recv_bytes > 0, p.time_us + want, 0.0), rtol=1e-12
    )


def test_busiest_link_by_hand():
    """Two nodes of two H100s: 5 copies 0 → 2 and 3 copies 1 → 2 (different rails, so via
    the spine) and 4 copies inside node 0. Device 2's NIC downlink carries all 8."""
    from moesim.sim.exchange import busiest_link

    topo = build_topology(get_profile("H100-SXM"), 4, 2)
    m = np.zeros((4, 4))
    m[0, 2], m[1, 2], m[0, 1] = 5, 3, 4
    i, load = busiest_link(m, topo)
    assert load == 8
    assert i == topo.tables["nic_down"][2]
    assert busiest_link(np.diag([1.0, 2, 3, 4]), topo) is None  # nothing leaves a device


def _skewed(d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.poisson(16, (d, d)) * rng.zipf(2.0, (d, d)).clip(max=20) * 7168.0
    np.fill_diagonal(m, 0.0)
    return m


@pytest.mark.parametrize(
    ("hw", "devices", "kwargs"),
    [
        ("H800", 32, {}),
        ("H800", 32, {"nodes_per_leaf": 2, "oversubscription": 4.0}),
        ("TPU-v6e", 16, {"dims": (4, 4)}),
    ],
)
def test_flow_tolerance_stays_close_to_exact(hw, devices, kwargs):
    """Batched events (rel_tol 0.01, the scenario default) keep every device's time within
    3 % of the exact max-min simulation, with far fewer rate recomputations."""
    profile = get_profile(hw)
    topo = build_topology(profile, devices, min(8, devices), **kwargs)
    m = _skewed(devices)
    exact = exchange_times(m, topo, profile, "flow", rel_tol=0.0)
    fast = exchange_times(m, topo, profile, "flow", rel_tol=0.01)
    ratio = fast.time_us / exact.time_us
    assert ratio.min() > 0.99 and ratio.max() < 1.03
    assert fast.events < 0.7 * exact.events


def test_flow_drain_times_rescale_exactly():
    """Max-min rates do not depend on the bytes, so scaling every flow scales every drain
    time (latencies stay); a flow-tier exchange's times are not rescaled afterwards."""
    from moesim.sim.flows import simulate_flows

    hw = get_profile("H800")
    topo = build_topology(hw, 16, 8, nodes_per_leaf=1, oversubscription=2.0)
    m = _skewed(16, seed=3)
    np.fill_diagonal(m, 0)
    src, dst = np.nonzero(m)
    routes = topo.routes(src, dst)
    for tol in (0.0, 0.01):
        base = simulate_flows(
            routes, m[src, dst] * 1.0, topo.capacity_gbps, topo.latency_us, rel_tol=tol
        )
        big = simulate_flows(
            routes, m[src, dst] * 2.5, topo.capacity_gbps, topo.latency_us, rel_tol=tol
        )
        np.testing.assert_allclose(big.drain_us, 2.5 * base.drain_us, rtol=1e-12)
        np.testing.assert_array_equal(big.latency_us, base.latency_us)
    with pytest.raises(ValueError, match="do not rescale"):
        exchange_times(m, topo, hw, "flow").scaled(2.5)


# ----- the numpy specification of the compiled flow solver (moesim/sim/_compiled.py) -----


def _maxmin_reference(ptr, links, weight, capacity, rel_tol):
    """Progressive filling written with numpy over the flows (with compaction)."""
    from moesim.sim.flows import _TIE, _sub_paths

    n_links = capacity.size
    rate = np.empty(weight.size)
    remaining = np.asarray(capacity, dtype=np.float64).copy()
    flows = np.arange(weight.size)
    w = np.repeat(weight, np.diff(ptr))
    live = flows.size
    level = 0.0
    tol = 1 + max(rel_tol, _TIE)
    while live:
        load = np.bincount(links, weights=w, minlength=n_links)
        used = np.flatnonzero(load > 0)
        share = remaining[used] / load[used]
        inc = float(share.min())
        remaining[used] -= inc * load[used]
        saturated = np.zeros(n_links, dtype=bool)
        saturated[used[level + share <= (level + inc) * tol + 1e-300]] = True
        level += inc
        hit = np.maximum.reduceat(saturated[links], ptr[:-1]) & (w[ptr[:-1]] > 0)
        rate[flows[hit]] = level
        live -= int(hit.sum())
        if live * 2 <= flows.size:
            keep = np.flatnonzero(~hit & (w[ptr[:-1]] > 0))
            flows = flows[keep]
            ptr, links = _sub_paths(ptr, links, keep)
            w = np.repeat(weight[flows], np.diff(ptr))
        else:
            w[np.repeat(hit, np.diff(ptr))] = 0.0
    return rate


def _drain_reference(ptr, links, weight, size, cap, rel_tol):
    """The drain loop written with numpy, every flow released at 0: (done_at, rate
    recomputations). Drains due within ``rel_tol`` of the clock of the first end with it."""
    from moesim.sim.flows import _TIE, _sub_paths

    remaining = size.copy()
    done_at = np.zeros(size.size)
    act = np.arange(size.size)
    act_ptr, act_links = ptr, links
    now = 0.0
    events = 0
    while act.size:
        rate = _maxmin_reference(act_ptr, act_links, weight[act], cap, rel_tol)
        ttf = remaining[act] / rate
        first = float(ttf.min())
        t_first = now + first
        ends = now + ttf <= (t_first + rel_tol * t_first) * (1 + _TIE) + 1e-300
        dt = float(ttf[ends].max())
        done_at[act[ends]] = now + ttf[ends]
        now += dt
        keep = np.flatnonzero(~ends)
        act = act[keep]
        remaining[act] -= rate[keep] * dt
        act_ptr, act_links = _sub_paths(act_ptr, act_links, keep)
        events += 1
    return done_at, events


@pytest.mark.parametrize("rel_tol", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_flow_solver_equals_its_numpy_spec(seed, rel_tol):
    from moesim.sim._compiled import fabric_kernel, maxmin_kernel

    rng = np.random.default_rng(seed)
    n_flows, n_links = 300, 40
    hops = rng.integers(1, 5, size=n_flows)
    ptr = np.concatenate(([0], np.cumsum(hops))).astype(np.int64)
    links = np.concatenate([rng.choice(n_links, h, replace=False) for h in hops]).astype(np.int64)
    weight = rng.integers(1, 4, size=n_flows).astype(np.float64)
    cap = rng.choice([50.0, 100.0, 400.0], size=n_links) * 1e3
    size = rng.pareto(1.5, size=n_flows) * 1e5 + 1.0
    rates = maxmin_kernel(ptr, links, weight, cap, rel_tol, np.arange(n_flows))
    np.testing.assert_array_equal(rates, _maxmin_reference(ptr, links, weight, cap, rel_tol))
    act, left, rate = np.arange(n_flows), size * weight, np.zeros(n_flows)  # members' sums
    zero, never = np.zeros(n_flows), np.full(n_flows, np.inf)  # released at 0; no answers
    _, act, idx, at, events, updates, _ = fabric_kernel(
        ptr, links, weight, cap, rel_tol, act, left, rate, zero, never, 0.0, np.inf, True
    )
    assert act.size == 0 and updates == events
    done = np.zeros(n_flows)
    done[idx] = at
    want_done, want_events = _drain_reference(ptr, links, weight, size, cap, rel_tol)
    np.testing.assert_allclose(done, want_done, rtol=1e-12)  # the clock's sums differ in order
    assert events == want_events


def test_identical_flows_merge_and_share_their_link_by_hand():
    """Two flows of 1,000 B on the same one link (1 GB/s = 1,000 B/us, 0.5 us latency)
    run as one merged flow of 2,000 B at the link's full rate: both drain at 2.0 us and
    finish at 2.5; a third on its own link drains alone in 1.0 us."""
    res = simulate_flows(
        Routes(np.array([0, 1, 2, 3]), np.array([0, 0, 1])),
        np.full(3, 1000.0),
        np.array([1.0, 1.0]),
        np.full(2, 0.5),
    )
    assert res.drain_us.tolist() == pytest.approx([2.0, 2.0, 1.0], rel=1e-12)
    assert res.finish_us.tolist() == pytest.approx([2.5, 2.5, 1.5], rel=1e-12)
