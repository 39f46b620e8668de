import numpy as np
import pytest

from moesim.hardware import get_profile
from moesim.sim.network import a2a_times_us


def test_uniform_all_to_all_matches_closed_form():
    hw = get_profile("H100-SXM")
    d, per_node, b = 16, 8, 1_000_000.0  # every device sends b bytes to every other device
    m = np.full((d, d), b)
    t = a2a_times_us(m, hw, domain_size=per_node)
    bw_up = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up * 1e3  # bytes/us
    bw_out = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
    expected = max((per_node - 1) * b / bw_up, (d - per_node) * b / bw_out)
    expected += max(hw.scale_up.latency_us, hw.scale_out.latency_us)
    assert t.time_us == pytest.approx(np.full(d, expected), rel=1e-12)
    assert t.sent_bytes.tolist() == [(d - 1) * b] * d
    assert t.cross_domain_bytes == d * (d - per_node) * b


def test_single_node_uses_only_scale_up():
    hw = get_profile("H100-SXM")
    m = np.full((8, 8), 450.0 * 0.8 * 1e3)  # 1 us of scale-up bandwidth per peer
    t = a2a_times_us(m, hw, domain_size=8)
    assert t.time_us == pytest.approx(np.full(8, 7.0 + hw.scale_up.latency_us))


def test_local_data_costs_nothing():
    hw = get_profile("H100-SXM")
    t = a2a_times_us(np.diag([1e9, 1e9]), hw, domain_size=8)
    assert t.time_us.tolist() == [0.0, 0.0]
