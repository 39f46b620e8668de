"""Count level, many layers at once: the same draws and routing as layer by layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.placement.base import Placement
from moesim.scenario import Scenario
from moesim.sim.counts import draw_counts, draw_counts_layers, route_counts, route_counts_layers
from moesim.sim.prepare import prepare
from moesim.sim.replay import StreamedRouting, route_layer_at
from tests.conftest import REPO


@pytest.mark.parametrize("tokens", [1000, 20])  # normal draws everywhere; some binomial
def test_layers_draw_what_each_layer_draws_alone(tokens):
    pi = np.array([[0.5, 0.3, 0.2], [0.6, 0.004, 0.396]])
    seeds = [11, 12]
    got = draw_counts_layers(pi, tokens, 4, 1, [np.random.default_rng(s) for s in seeds])
    for li, s in enumerate(seeds):
        want = draw_counts(pi[li], tokens, 4, 1, np.random.default_rng(s))
        assert got[li].tolist() == want.tolist()


def test_two_layers_routed_at_once_by_hand():
    # layer 0: expert 0 on device 0, expert 1 on device 1; layer 1: swapped
    slots = [np.array([[0], [1]]), np.array([[1], [0]])]
    place = [Placement(s[None], 2) for s in slots]
    reps = [p.replicas(0) for p in place]
    counts = np.array([[[3, 1], [2, 4]], [[5, 0], [1, 1]]])
    got = route_counts_layers(
        counts, slots, [t for t, _ in reps], [n for _, n in reps], devices_per_node=2, capacity=4
    )
    # layer 0: slot 0 (expert 0) gets 3 + 2 = 5 > 4, keeps 4/5 of each sender's; slot 1
    # (expert 1) gets 1 + 4 = 5 > 4 likewise
    assert got[0].routed_load.tolist() == [5.0, 5.0]
    np.testing.assert_allclose(got[0].dispatch, [[2.4, 0.8], [1.6, 3.2]], rtol=1e-6)
    np.testing.assert_allclose(got[0].dropped, [0.8, 1.2], rtol=1e-6)
    # layer 1: device 0 hosts expert 1 (0 + 1 = 1), device 1 expert 0 (5 + 1 = 6 > 4)
    assert got[1].routed_load.tolist() == [1.0, 6.0]
    np.testing.assert_allclose(got[1].dispatch, [[0.0, 5 * 4 / 6], [1.0, 4 / 6]], rtol=1e-6)
    assert got[1].device_load.tolist() == [1.0, 4.0]
    assert (got[1].assignments, got[1].dropless_capacity_factor) == (7, 6 / 3.5)
    for li in range(2):  # and each layer as route_counts routes it alone, to the bit
        one = route_counts(counts[li], slots[li], *reps[li], devices_per_node=2, capacity=4)
        for field in ("device_load", "expert_tokens", "dispatch", "dropped", "routed_load"):
            assert getattr(got[li], field).tolist() == getattr(one, field).tolist(), field


def test_streamed_step_routes_every_layer_as_layer_by_layer():
    sc = Scenario.model_validate(
        {
            "hardware": "H100-SXM",
            "cluster": {"nodes": 1, "devices_per_node": 8},
            "model": "Mixtral-8x7B",
            "routing": {"synthetic": {"distribution": "zipf:s=1.2", "level": "count"}},
            "mode": "prefill",
            "tokens_per_device": 512,
            "sequence_length": 512,
            "capacity": {"factor": 1.0},
            "dispatcher": "nccl-alltoallv",
            "seed": 3,
        }
    )
    prep = prepare(sc, Path(REPO))
    streamed = StreamedRouting(prep, 1, 0, 1)
    assert streamed.ahead is not None  # 32 layers x 8 devices x 8 slots: one pass
    for li, layer in enumerate(prep.moe_layers):
        got, want = streamed[layer], route_layer_at(prep, 1, li)
        assert got.dispatch is not None and want.dispatch is not None
        assert got.dispatch.tolist() == want.dispatch.tolist()
        assert got.dropped.tolist() == want.dropped.tolist()
        assert got.expert_load.tolist() == want.expert_load.tolist()  # type: ignore[union-attr]
