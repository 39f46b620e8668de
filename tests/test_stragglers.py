"""Straggler injection: slow devices, jitter and degraded NICs, against exact answers."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.hardware import get_profile
from moesim.scenario import Scenario
from moesim.sim.engine import Compute, Exchange
from moesim.sim.exchange import exchange_times
from moesim.sim.program import apply_stragglers
from moesim.sim.simulate import simulate
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
    with pytest.raises(ValueError, match="factors > 0"):
        _uniform_scenario(tmp_path, stragglers={"degraded_nics": {1: 0.0}})
