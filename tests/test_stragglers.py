"""Stragglers: injection (slow devices, jitter, degraded NICs) and naming them on the
critical path, against exact answers."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from moesim.balance import balance_ratio
from moesim.hardware import get_profile
from moesim.paths import scenarios_dir
from moesim.report.summary import console_summary
from moesim.report.timeline import timeline_events
from moesim.scenario import Scenario
from moesim.sim.engine import Compute, Exchange, run_program
from moesim.sim.exchange import exchange_times
from moesim.sim.program import apply_stragglers
from moesim.sim.simulate import simulate
from moesim.sim.stragglers import (
    LayerStraggler,
    classify_cause,
    critical_path,
    layer_straggler,
    straggler_penalty,
)
from moesim.topology import build_topology
from moesim.traces.store import RoutingTrace, write_trace
from tests.test_simulate import TINY_MODEL


def test_apply_stragglers_scales_compute_only():
    ops = [
        Compute("a", "other", np.array([1.0, 2.0, 3.0])),
        Exchange("x", "dispatch", np.array([5.0, 5.0, 5.0]), np.ones((3, 3), bool)),
    ]
    out = apply_stragglers(ops, np.array([1.0, 2.0, 1.0]), 0.0, np.random.default_rng(0))
    assert out[0].duration_us.tolist() == [1.0, 4.0, 3.0]
    assert out[1].duration_us.tolist() == [5.0, 5.0, 5.0]
    assert ops[0].duration_us.tolist() == [1.0, 2.0, 3.0]  # the input is not changed
    many = [Compute(f"c{i}", "other", np.ones(4)) for i in range(2000)]
    a = apply_stragglers(many, np.ones(4), 0.1, np.random.default_rng(7))
    b = apply_stragglers(many, np.ones(4), 0.1, np.random.default_rng(7))
    fa = np.array([op.duration_us for op in a])
    assert (fa == np.array([op.duration_us for op in b])).all()  # seeded
    assert fa.mean() == pytest.approx(1.0, abs=0.01) and fa.std() == pytest.approx(0.1, rel=0.1)


def _uniform_scenario(tmp_path, **extra) -> Scenario:
    ids = np.tile(np.arange(4), 16)[None, :, None]  # every device sends one token to each
    trace = RoutingTrace(
        expert_ids=np.concatenate([ids, ids]).astype(np.int32),
        gate_weights=np.ones((2, 64, 1), np.float32),
        steps=np.zeros(64, np.int32),
        layers=(0, 1),
        num_experts=4,
    )
    write_trace(trace, tmp_path / "tr")
    data = {
        "name": "t",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 4},
        "model": TINY_MODEL,
        "routing": {"trace": str(tmp_path / "tr")},
        "mode": "prefill",
        "tokens_per_device": 16,
    } | extra
    return Scenario.model_validate(data)


def test_slow_device_delays_every_exchange_by_its_extra_compute(tmp_path):
    base = simulate(_uniform_scenario(tmp_path), tmp_path).runs[0]
    f = 1.75
    slow = simulate(
        _uniform_scenario(tmp_path, stragglers={"slow_devices": {2: f}}), tmp_path
    ).runs[0]
    m = base.metrics
    compute_dev2 = float(
        (m.loc[m.device == 2, "expert_us"] + m.loc[m.device == 2, "other_us"]).sum()
    )
    assert slow.summary["step_time_us"] == pytest.approx(
        base.summary["step_time_us"] + (f - 1) * compute_dev2, rel=1e-12
    )
    # the next layer's dispatch starts later on every device by device 2's extra compute
    rec_b, rec_s = base.records[0], slow.records[0]
    names = [op.name for op in base.program]
    i = names.index("L1 dispatch")
    extra = (f - 1) * sum(
        float(op.duration_us[2]) for op in base.program[:i] if isinstance(op, Compute)
    )
    np.testing.assert_allclose(rec_s.start_us[i] - rec_b.start_us[i], extra, rtol=1e-12)
    # the fast devices now wait at every exchange
    assert slow.metrics.loc[slow.metrics.device == 0, "wait_us"].sum() > 0
    assert slow.summary["critical_device"] == 2


def test_jitter_is_seeded(tmp_path):
    a = simulate(_uniform_scenario(tmp_path, stragglers={"jitter": 0.2}, seed=3), tmp_path)
    b = simulate(_uniform_scenario(tmp_path, stragglers={"jitter": 0.2}, seed=3), tmp_path)
    c = simulate(_uniform_scenario(tmp_path, stragglers={"jitter": 0.2}, seed=4), tmp_path)
    step = [r.runs[0].summary["step_time_us"] for r in (a, b, c)]
    assert step[0] == step[1] != step[2]


def test_degraded_nic_slows_its_device_and_in_flows_its_receivers():
    hw = get_profile("H100-SXM")
    topo = build_topology(hw, 16, 8).degrade_nics({0: 0.5})
    b = 1e6
    m = np.zeros((16, 16))
    m[:8, 8:] = b  # node 0 sends b to every device of node 1
    nic = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
    lat = hw.scale_out.latency_us
    a = exchange_times(m, topo, hw, "analytic")
    f = exchange_times(m, topo, hw, "flow")
    assert a.time_us[0] == pytest.approx(8 * b / (0.5 * nic) + lat)
    assert a.time_us[1] == pytest.approx(8 * b / nic + lat)
    assert f.time_us[0] == pytest.approx(8 * b / (0.5 * nic) + lat)
    # every receiver waits for its flow from device 0, which the analytic tier cannot see
    assert f.time_us[8:] == pytest.approx(np.full(8, 8 * b / (0.5 * nic) + lat))
    assert a.time_us[8] == pytest.approx(8 * b / nic + lat)


def test_bad_straggler_device(tmp_path):
    from moesim.errors import InputError

    with pytest.raises(InputError, match="stragglers"):
        simulate(_uniform_scenario(tmp_path, stragglers={"slow_devices": {9: 2.0}}), tmp_path)
    with pytest.raises(ValueError, match=r"bandwidth factors in \(0, 1\]"):
        _uniform_scenario(tmp_path, stragglers={"degraded_nics": {1: 0.0}})
    with pytest.raises(ValueError, match=r"bandwidth factors in \(0, 1\]"):
        _uniform_scenario(tmp_path, stragglers={"degraded_nics": {1: 1.5}})  # faster
    with pytest.raises(ValueError, match="compute time factors >= 1"):
        _uniform_scenario(tmp_path, stragglers={"slow_devices": {3: 0.5}})  # faster


# ----- the critical path, hand-computed ----------------------------------------------------


def _layer_program() -> list:
    """3 devices, one MoE layer (0) then the next layer's first op.

    Hand-run: attention ends at 1 everywhere; the dispatch runs 1 → 3; experts end at
    6, 9, 6; the dense combine starts on every device when the last (device 1) is ready, 9,
    and ends at 11, 11, 13 (device 2 sends three times the bytes); the next layer starts at
    11, 11, 13.
    """
    ten = np.full(3, 10.0)
    return [
        Compute("L0 attention", "other", np.ones(3), 0),
        Exchange("L0 dispatch", "dispatch", np.full(3, 2.0), None, ten, ten, 0),
        Compute("L0 experts", "expert", np.array([3.0, 6.0, 3.0]), 0),
        Exchange(
            "L0 combine",
            "combine",
            np.array([2.0, 2.0, 4.0]),
            None,
            np.array([10.0, 10.0, 30.0]),
            ten,
            0,
        ),
        Compute("L1 attention", "other", np.ones(3), 1),
    ]


def test_critical_path_walks_back_through_the_wait():
    prog = _layer_program()
    rec = run_program(prog, 3)
    assert rec.start_us[3].tolist() == [9.0, 9.0, 9.0]
    assert rec.end_us[3].tolist() == [11.0, 11.0, 13.0]
    # from device 2's combine (the layer's last end) back to device 1, whose experts it
    # waited for, then down device 1's own ops
    assert critical_path(prog, rec, 3, 2, {0, 1, 2, 3}) == [(3, 2), (2, 1), (1, 1), (0, 1)]


def test_layer_straggler_is_the_most_charged_device_not_the_last_to_finish():
    prog = _layer_program()
    rec = run_program(prog, 3)
    got = layer_straggler(prog, rec, [0, 1, 2, 3])
    # charged beyond each op's mean: device 2's combine 4 - 8/3 = 4/3, device 1's experts
    # 6 - 4 = 2 (its dispatch and attention 0): device 1 held the layer back, by 2 µs
    assert got == LayerStraggler(
        device=1, cause="expert compute", op=2, phase="expert", excess_us=2.0, gate_device=2
    )


def test_layer_straggler_of_a_balanced_layer_is_none():
    ones = np.ones(2)
    prog = [
        Compute("a", "other", ones, 0),
        Exchange("x", "dispatch", ones, None, ones, ones, 0),
    ]
    got = layer_straggler(prog, run_program(prog, 2), [0, 1])
    assert got == LayerStraggler(0, "none", -1, "expert", 0.0, 0)


def test_critical_path_with_two_streams():
    # compute stream: a (2, 5) then b (1, 1); comm stream: x after a. Hand-run: a ends at 2
    # and 5; x starts at 5 on both (device 0 waits for device 1) and ends at 6; b runs 2-3
    # and 5-6. Both devices end at 6: device 0 (lowest id) is the gate, its x waited for
    # device 1, whose a is charged 5 - 3.5 = 1.5.
    prog = [
        Compute("a", "other", np.array([2.0, 5.0]), 0, after=()),
        Exchange("x", "dispatch", np.ones(2), None, np.ones(2), np.ones(2), 0, after=(0,)),
        Compute("b", "other", np.ones(2), 0, after=()),
    ]
    rec = run_program(prog, 2)
    assert rec.start_us.tolist() == [[0.0, 0.0], [5.0, 5.0], [2.0, 5.0]]
    assert critical_path(prog, rec, 1, 0, {0, 1, 2}) == [(1, 0), (0, 1)]
    assert layer_straggler(prog, rec, [0, 1, 2]) == LayerStraggler(
        1, "other compute", 0, "other", 1.5, 0
    )


def test_layer_straggler_names_injected_slowness():
    prog = _layer_program()
    base = np.array([op.duration_us for op in prog])
    slow = apply_stragglers(prog, np.array([1.0, 1.0, 3.0]), 0.0, np.random.default_rng(0))
    rec = run_program(slow, 3)
    # device 2 computes 3x: attention 0-3, dispatch 3-5, experts 5-14; the combine waits
    # for it everywhere. Its experts are charged 9 - 6 = 3 (attention 3 - 5/3 = 4/3), and
    # the 6 µs of injected time outweigh its own work beyond the mean (3 - 4 < 0)
    got = layer_straggler(slow, rec, [0, 1, 2, 3], base_us=base, slow_devices={2: 3.0})
    assert (got.device, got.cause, got.op) == (2, "slow device", 2)
    jit = layer_straggler(slow, rec, [0, 1, 2, 3], base_us=base, jitter=0.1)
    assert jit.cause == "jitter"


def test_classify_cause():
    ex = _layer_program()[3]  # device 2 sends 30 bytes, receives 10
    comp = _layer_program()[2]
    none: dict[int, float] = {}
    kw = {"slow_devices": none, "jitter": 0.0, "degraded_nics": none}
    assert classify_cause(comp, 1, 6.0, 6.0, 4.0, **kw) == "expert compute"
    assert classify_cause(_layer_program()[0], 1, 2.0, 2.0, 1.0, **kw) == "other compute"
    # injected 2 µs against 0 of its own beyond the mean
    assert classify_cause(comp, 1, 6.0, 4.0, 4.0, **kw | {"slow_devices": {1: 1.5}}) == (
        "slow device"
    )
    assert classify_cause(comp, 1, 6.0, 4.0, 4.0, **kw | {"jitter": 0.2}) == "jitter"
    # jitter adds 1 µs, its own load 2 µs: the load is the cause
    assert classify_cause(comp, 1, 7.0, 6.0, 4.0, **kw | {"jitter": 0.2}) == "expert compute"
    assert classify_cause(ex, 2, 4.0, 4.0, 2.0, **kw) == "sending"
    assert classify_cause(ex, 0, 4.0, 4.0, 2.0, **kw | {"degraded_nics": {0: 0.5}}) == (
        "slow NIC or link"
    )
    rev = Exchange("c", "combine", np.ones(2), None, np.array([1.0, 1.0]), np.array([1.0, 3.0]))
    assert classify_cause(rev, 1, 1.0, 1.0, 1.0, **kw) == "receiving"
    # flow tier: 5 % or more above what every device's ports allow (a slow shared link)
    lim = Exchange(
        "f", "dispatch", np.array([2.0, 2.2]), None, np.ones(2), np.ones(2),
        port_limited_us=np.array([2.0, 2.0]),
    )  # fmt: skip
    assert classify_cause(lim, 1, 2.2, 2.2, 2.1, **kw) == "slow NIC or link"
    assert classify_cause(lim, 0, 2.0, 2.0, 2.1, **kw) == "sending"
    assert classify_cause(lim, 1, 2.09, 2.09, 2.1, **kw) == "sending"
    # device 0 takes 2.9 against its own ports' 2.0: device 1's ports (3.0) explain it, a
    # busy peer unless device 1's NIC is degraded
    peer = Exchange(
        "f", "dispatch", np.array([2.9, 3.0, 2.0]), None, np.ones(3), np.full(3, 2.0),
        port_limited_us=np.array([2.0, 3.0, 2.0]),
    )  # fmt: skip
    assert classify_cause(peer, 0, 2.9, 2.9, 2.6, **kw) == "receiving"
    assert classify_cause(peer, 0, 2.9, 2.9, 2.6, **kw | {"degraded_nics": {1: 0.5}}) == (
        "slow NIC or link"
    )


def test_straggler_penalty_and_balance_ratio():
    assert straggler_penalty(np.array([3.0, 6.0, 3.0])) == 0.5  # (6 - 4) / 4
    assert straggler_penalty(np.zeros(3)) == 0.0
    assert balance_ratio(np.array([6, 6, 12, 8])) == 1.5  # 12 / 8
    assert balance_ratio(np.zeros(4)) == 1.0


# ----- the demo cluster with injected faults ------------------------------------------------


def _demo_like(**extra) -> Scenario:
    """The demo's cluster (2 nodes x 8 H100) and model, contiguous placement, uniform
    routing, dropless, every (token, expert) copy sent directly (NCCL's all-to-all-v), so
    that every device hears from every other."""
    data = yaml.safe_load((scenarios_dir() / "demo.yaml").read_text())
    data |= {
        "routing": {"synthetic": {"distribution": "uniform"}},
        "placement": "contiguous",
        "redundant_slots": 0,
        "mode": "prefill",
        "capacity": {"factor": None},
        "dispatcher": "nccl-alltoallv",
    }
    return Scenario.model_validate(data | extra)


def _last_end(run, name: str) -> tuple[int, float]:
    """(device, time) of the latest end of op ``name`` in the records."""
    i = [op.name for op in run.program].index(name)
    end = run.records[0].end_us[i]
    return int(np.argmax(end)), float(end.max())


@pytest.fixture(scope="module")
def degraded_nic(tmp_path_factory):
    return simulate(
        _demo_like(stragglers={"degraded_nics": {5: 0.5}}), tmp_path_factory.mktemp("n")
    )


def test_degraded_nic_is_named_with_its_cause(degraded_nic):
    run = degraded_nic.runs[0]
    s = run.summary
    assert s["straggler_device"] == [5, 5, 5, 5]
    assert s["straggler_cause"] == ["slow NIC or link"] * 4
    assert s["injected"] == {"degraded_nics": {"5": 0.5}}
    names = [op.name for op in run.program]
    for layer in s["layers"]:
        # device 5 finishes each layer last (its combine crawls through its NIC): the next
        # layer's first op on it starts at that end, after every other device's
        dev, end = _last_end(run, f"L{layer} unpermute")
        assert dev == 5
        nxt = run.records[0].start_us[names.index(f"L{layer} unpermute") + 1]
        assert nxt[5] == end and int(np.argmax(nxt)) == 5


def test_slow_device_is_named_and_the_timeline_agrees(tmp_path):
    result = simulate(_demo_like(stragglers={"slow_devices": {3: 1.5}}), tmp_path)
    run = result.runs[0]
    s = run.summary
    assert s["straggler_device"] == [3, 3, 3, 3]
    assert s["straggler_cause"] == ["slow device"] * 4
    events = timeline_events(result)
    names = [op.name for op in run.program]
    for layer in s["layers"]:
        # every device's combine starts when device 3's experts end: the last to end
        dev, end = _last_end(run, f"L{layer} experts")
        assert dev == 3
        comb = run.records[0].start_us[names.index(f"L{layer} combine")]
        assert comb.min() == end
        # the timeline shows the same: device 3's experts span ends last, and the
        # straggler mark sits on device 3
        spans = [e for e in events if e["ph"] == "X" and e["name"] == f"L{layer} experts"]
        assert max(spans, key=lambda e: e["ts"] + e["dur"])["pid"] == 3
        marks = [e for e in events if e["name"].startswith(f"straggler of layer {layer}:")]
        assert [(m["pid"], m["name"]) for m in marks] == [
            (3, f"straggler of layer {layer}: slow device")
        ]
    assert "injected: device 3 compute x1.5" in console_summary(result)


def test_degraded_nic_in_the_flow_tier(tmp_path):
    # the flow tier slows device 5's peers too: each layer's straggler is device 5 or a
    # device whose transfers with it took as long as device 5's ports allow
    run = simulate(
        _demo_like(network={"tier": "flow"}, stragglers={"degraded_nics": {5: 0.5}}), tmp_path
    ).runs[0]
    s = run.summary
    assert s["straggler_cause"] == ["slow NIC or link"] * 4
    assert 5 in s["straggler_device"]
    names = [op.name for op in run.program]
    for layer, dev, phase in zip(
        s["layers"], s["straggler_device"], s["straggler_phase"], strict=True
    ):
        i = names.index(f"L{layer} {phase}")
        took = run.records[0].duration_us[i, dev]
        assert dev == 5 or took >= run.program[i].port_limited_us[5]


def test_flow_timeline_shows_each_side_of_a_transfer(tmp_path):
    # device 3 computes 1.5x slower: in the flow tier its dispatch is released last, while
    # every device has been receiving the others' transfers since before then
    from moesim.report.timeline import RECV_TID, SEND_TID

    sc = _demo_like(network={"tier": "flow"}, stragglers={"slow_devices": {3: 1.5}})
    events = timeline_events(simulate(sc, tmp_path))
    disp = [e for e in events if e["ph"] == "X" and e["name"] == "L0 dispatch"]
    send = {e["pid"]: e for e in disp if e["tid"] == SEND_TID}
    recv = {e["pid"]: e for e in disp if e["tid"] == RECV_TID}
    assert len(send) == len(recv) == 16
    assert max(send, key=lambda p: send[p]["ts"]) == 3
    assert all(r["ts"] < send[3]["ts"] for r in recv.values())
    assert all("sent_bytes" in e["args"] for e in send.values())
    assert all("recv_bytes" in e["args"] for e in recv.values())


def test_attribution_names_the_stragglers_hottest_expert_and_the_busiest_pair():
    """Device 0 is the straggler: its second slot (expert 3) has 5 tokens, its first 1;
    the busiest off-diagonal pair is 1 -> 0 with 4 copies, each 10 bytes there and back."""
    from moesim.sim.metrics import _attribution
    from moesim.sim.routing import LayerRouting

    lr = LayerRouting(
        device_load=np.array([6, 2]),
        expert_tokens=np.array([[1, 5], [2, 0]]),
        dispatch=None,
        copies=np.array([[9, 1], [4, 3]]),
        dropped=np.zeros(2, dtype=np.int64),
        rerouted=0,
        assignments=8,
    )
    got = _attribution(lr, np.array([[7, 3], [1, 2]]), 0, 10.0)
    expected = {
        "straggler_expert": 3,
        "straggler_expert_tokens": 5.0,
        "straggler_load": 6,
        "busiest_pair_src": 1,
        "busiest_pair_dst": 0,
        "busiest_pair_bytes": 40.0,
    }
    assert {k: got[k] for k in expected} == expected


def test_busiest_flow_looks_past_a_float_diagonal():
    """The largest entry, 9, is on the diagonal: the busiest flow is the next, 1 -> 0 with
    2.5; the matrix is left as it was."""
    from moesim.sim.routing import busiest_flow

    m = np.array([[9.0, 1.0], [2.5, 0.5]])
    assert busiest_flow(m) == (1, 0, 2.5)
    assert m.tolist() == [[9.0, 1.0], [2.5, 0.5]]


def test_union_of_intervals_by_hand():
    """[0, 2) and [5, 7) u [6, 8) = [5, 8): 2 + 3 = 5 us; an empty [4, 4) adds nothing."""
    from moesim.sim.metrics import _union_us

    start, end = np.array([6.0, 0.0, 5.0, 4.0]), np.array([8.0, 2.0, 7.0, 4.0])
    assert _union_us(start, end) == 5.0


def test_jitter_is_named_as_the_cause(tmp_path):
    """Injected jitter (no slow device listed) makes the straggler's compute the cause,
    named "jitter"; the summary names the scenario, and a dropless run drops nothing."""
    sc = _demo_like(stragglers={"jitter": 0.5})
    run = simulate(sc, tmp_path).runs[0]
    s = run.summary
    assert s["scenario"] == sc.name
    assert "jitter" in s["straggler_cause"]
    assert run.layers["drop_rate"].tolist() == [0.0] * len(s["layers"])
    # contiguous placement, 32 experts on 16 devices: device i hosts experts 2i and 2i + 1,
    # so the straggler's most loaded expert is one of its own two
    hosted = run.layers["straggler_expert"].to_numpy() // 2
    assert hosted.tolist() == run.layers["straggler_device"].tolist()
