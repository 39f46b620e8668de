"""Memory per device against hand computations (Mixtral-8x7B, from its published config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.costs.memory import dense_params, kv_cache_bytes_per_token, memory_per_device
from moesim.errors import InputError
from moesim.model.shapes import get_preset
from moesim.scenario import Scenario
from moesim.sim.simulate import simulate

# Mixtral-8x7B: h 4096, 32 layers, 8 experts of d_ff 14336 (SwiGLU), top-2, 32 heads with
# 8 KV heads of 128, vocabulary 32000, untied embeddings, RMSNorm.
ATTENTION = 4096 * 4096 + 2 * 4096 * 8 * 128 + 4096 * 4096  # q, k and v, o: 41,943,040
PER_LAYER_DENSE = ATTENTION + 2 * 4096 + 4096 * 8  # + two norms + router: 41,984,000
DENSE = 32 * PER_LAYER_DENSE + 4096 + 2 * 32000 * 4096  # + final norm + embed/head
EXPERT = 3 * 4096 * 14336  # 176,160,768
KV_PER_TOKEN = 2 * 8 * 128 * 2 * 32  # k and v, 8 heads of 128, bf16, 32 layers: 131,072 B


def test_mixtral_parameter_counts_by_hand():
    shape = get_preset("Mixtral-8x7B")
    assert dense_params(shape) == DENSE == 1_605_636_096
    assert shape.expert_params() == EXPERT
    assert kv_cache_bytes_per_token(shape, "bf16") == KV_PER_TOKEN


def test_decode_memory_matches_hand_computation():
    shape = get_preset("Mixtral-8x7B")
    mem = memory_per_device(
        shape,
        num_devices=8,
        mode="decode",
        tokens_per_device=64,
        sequence_length=4096,
        precision="bf16",
        capacity_factor=1.25,
        hbm_bytes=80e9,
    )
    dense_bytes = 2 * DENSE  # replicated, bf16
    expert_bytes = 2 * 32 * 1 * EXPERT  # one expert slot per MoE layer on each of 8 devices
    kv = 64 * 4096 * KV_PER_TOKEN  # 64 sequences of 4,096 tokens
    # one MoE layer's activations per token: attention + norms 15 h, fp32 router logits 4 E,
    # 1.25 x top-2 assignments of 2 B x (2 h + 3 d_ff)
    act = 64 * (15 * 4096 + 4 * 8 + 1.25 * 2 * 2 * (2 * 4096 + 3 * 14336))
    assert mem.dense_weights_bytes == dense_bytes == 3_211_272_192
    assert mem.expert_weights_bytes == expert_bytes == 11_274_289_152
    assert mem.kv_cache_bytes == kv == 34_359_738_368
    assert mem.activation_bytes == act == 20_318_208
    assert mem.optimizer_bytes == 0
    assert mem.total_bytes == 48_865_617_920
    assert mem.fits


def test_training_adds_gradients_optimizer_and_every_layers_activations():
    shape = get_preset("Mixtral-8x7B")
    mem = memory_per_device(
        shape,
        num_devices=8,
        mode="training",
        tokens_per_device=64,
        sequence_length=4096,
        precision="fp8",
        capacity_factor=None,
        hbm_bytes=80e9,
    )
    params = DENSE + 32 * EXPERT
    assert mem.dense_weights_bytes + mem.expert_weights_bytes == params  # fp8: 1 B each
    assert mem.optimizer_bytes == 14 * params
    # unlimited capacity: top_k assignments per token, all 32 MoE layers kept
    assert mem.activation_bytes == 64 * 32 * (15 * 4096 + 32 + 2 * 2 * (2 * 4096 + 3 * 14336))
    assert mem.kv_cache_bytes == 0


def test_int4_halves_fp8_weights_and_more_devices_hold_fewer_experts():
    shape = get_preset("Mixtral-8x7B")
    kw = dict(mode="decode", tokens_per_device=1, sequence_length=1, capacity_factor=1.0)
    fp8 = memory_per_device(shape, num_devices=2, precision="fp8", hbm_bytes=1, **kw)
    int4 = memory_per_device(shape, num_devices=2, precision="int4", hbm_bytes=1, **kw)
    assert int4.expert_weights_bytes * 2 == fp8.expert_weights_bytes == 32 * 4 * EXPERT
    assert not int4.fits
    with pytest.raises(InputError, match="precision"):
        memory_per_device(shape, num_devices=2, precision="fp4", hbm_bytes=1, **kw)


def test_simulate_summary_reports_memory_per_device():
    sc = Scenario(
        hardware="H100-SXM",
        cluster={"nodes": 1, "devices_per_node": 8},
        model="Mixtral-8x7B",
        routing={"synthetic": {"distribution": "uniform"}},
        capacity={"factor": 1.25},
        mode="decode",
        tokens_per_device=64,
        sequence_length=4096,
    )
    s = simulate(sc, Path(".")).runs[0].summary
    assert s["memory_per_device_bytes"] == 48_865_617_920
    assert s["hbm_bytes"] == 80e9 and s["memory_fits"] is True
    assert s["memory_breakdown_bytes"]["kv_cache_bytes"] == 34_359_738_368
