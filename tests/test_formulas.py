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
from tests.conftest import routing_of


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
