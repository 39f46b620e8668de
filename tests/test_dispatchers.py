"""Dispatcher presets: fixed cost, SM share, per-pass dtypes, overrides, group-limited routing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moesim.dispatchers import (
    PRESETS,
    DispatcherChoice,
    compute_slowdown,
    default_preset,
    get_dispatcher,
)
from moesim.errors import InputError
from moesim.hardware import get_profile
from moesim.scenario import Scenario
from moesim.sim.engine import Compute
from moesim.sim.program import apply_sm_share
from moesim.traces.synthetic import synthesize
from tests.conftest import REPO, routing_of


def test_fixed_cost_is_launches_plus_round_trips():
    h800 = get_profile("H800")  # 5 us a launch
    # deepep-normal: 2 launches + 1 round trip of a 5 us path = 10 + 10
    assert get_dispatcher("deepep-normal").fixed_us(h800, 5.0) == 20.0
    # megatron-alltoall: 3 launches + 2 round trips of 8 us = 15 + 32
    assert get_dispatcher("megatron-alltoall").fixed_us(h800, 8.0) == 47.0
    # deepep-low-latency: one launch, nothing exchanged first
    assert get_dispatcher("deepep-low-latency").fixed_us(h800, 8.0) == 5.0


def test_sm_share_slowdown_by_hand():
    h800 = get_profile("H800")
    assert h800.compute.sm_count == 132
    # 20 of 132 SMs held: compute runs on 112, 132 / 112 as long
    assert compute_slowdown(h800, get_dispatcher("deepep-normal")) == pytest.approx(132 / 112)
    assert compute_slowdown(h800, get_dispatcher("deepep-low-latency")) == 1.0
    # a profile without an SM count (a TPU) is not slowed
    assert compute_slowdown(get_profile("TPU-v5p"), get_dispatcher("nccl-alltoallv")) == 1.0
    # the profile's interference on top: 132 / 112 x 1.1
    from moesim.costs.fit import with_efficiency

    busy = with_efficiency(h800, comm_interference=0.1)
    assert compute_slowdown(busy, get_dispatcher("deepep-normal")) == pytest.approx(132 / 112 * 1.1)
    assert compute_slowdown(busy, get_dispatcher("deepep-low-latency")) == pytest.approx(1.1)
    with pytest.raises(InputError, match="every one of the 132 SMs"):
        compute_slowdown(h800, DispatcherChoice(preset="deepep-normal", sms=132).resolve(h800))


def test_apply_sm_share_spares_memory_bound_permutes():
    d = np.array([10.0, 20.0])
    prog = [
        Compute("L0 experts", "expert", d, phase="experts"),
        Compute("L0 router+permute", "other", d, phase="router+permute"),
        Compute("L0 unpermute bwd", "other", d, phase="unpermute bwd"),
    ]
    out = apply_sm_share(prog, 1.5)
    assert [op.duration_us.tolist() for op in out] == [[15.0, 30.0], [10.0, 20.0], [10.0, 20.0]]
    assert apply_sm_share(prog, 1.0) is prog


def test_auto_resolves_by_vendor_and_overrides_keep_their_source():
    assert default_preset(get_profile("H800")) == "deepep-normal"
    assert default_preset(get_profile("MI300X")) == "nccl-alltoallv"
    assert default_preset(get_profile("A100-80GB")) == "nccl-alltoallv"  # no FP8, pre-Hopper
    assert default_preset(get_profile("B200")) == "deepep-normal"
    assert default_preset(get_profile("TPU-v5p")) == "nccl-alltoallv"
    h800 = get_profile("H800")
    d = DispatcherChoice(grad_dispatch_dtype="bf16").resolve(h800)
    assert (d.name, d.dedup, d.dispatch_dtype, d.grad_dispatch_dtype) == (
        "deepep-normal",
        "node",
        "fp8",
        "bf16",
    )
    assert d.sources["grad_dispatch_dtype"] == "set in the scenario"
    assert d.sources["dispatch_dtype"] == PRESETS["deepep-normal"].sources["dispatch_dtype"]
    with pytest.raises(InputError, match="unknown dispatcher"):
        get_dispatcher("gloo")


def test_every_preset_field_has_a_source():
    for p in PRESETS.values():
        fields = set(p.model_dump(exclude={"name", "sources"}))
        assert set(p.sources) == fields, p.name


def _scenario(**kw) -> dict:
    return {
        "hardware": "H800",
        "cluster": {"nodes": 1, "devices_per_node": 8},
        "model": "DeepSeek-V3",
        "routing": {"synthetic": {"distribution": "uniform"}},
        "tokens_per_device": 64,
    } | kw


def test_scenario_names_a_preset_or_overrides_it_and_old_fields_say_where_they_went():
    assert Scenario.model_validate(_scenario()).dispatcher.preset == "auto"
    sc = Scenario.model_validate(_scenario(dispatcher="nccl-alltoallv"))
    assert sc.dispatcher.preset == "nccl-alltoallv"
    sc = Scenario.model_validate(_scenario(dispatcher={"preset": "deepep-normal", "sms": 24}))
    assert sc.dispatcher.resolve(get_profile("H800")).sms == 24
    with pytest.raises(ValueError, match="unknown preset"):
        Scenario.model_validate(_scenario(dispatcher="gloo"))
    with pytest.raises(ValueError, match=r"'dispatch_dtype' moved into the dispatcher"):
        Scenario.model_validate(_scenario(dispatch_dtype="fp8"))
    with pytest.raises(ValueError, match=r"'network\.dedup' moved into the dispatcher"):
        Scenario.model_validate(_scenario(network={"dedup": "node"}))


def test_training_sends_each_pass_in_the_dispatchers_dtype(tmp_path):
    """DeepSeek-V3's recipe: FP8 dispatch and gradient dispatch (7,168 + 56 x 4 = 7,392
    bytes a copy), BF16 combine and gradient combine (14,336 bytes)."""
    from moesim.sim.simulate import simulate

    sc = Scenario.model_validate(
        _scenario(
            model={
                "name": "tiny-v3",
                "num_layers": 1,
                "d_model": 7168,
                "expert_d_ff": 256,
                "num_experts": 8,
                "top_k": 1,
                "attention": {"num_heads": 8},
                "vocab_size": 1000,
                "source": "test",
            },
            mode="training",
            dispatcher="deepep-normal",
        )
    )
    run = simulate(sc, tmp_path).runs[0]
    sent = {
        op.phase: float(op.sent_bytes.sum())
        for op in run.program
        if op.category in ("dispatch", "combine")
    }
    copies = sent["dispatch"] / 7392
    assert copies == int(copies) and copies > 0
    assert sent == pytest.approx(
        {
            "dispatch": copies * 7392,
            "combine": copies * 14336,
            "combine bwd": copies * 7392,  # the gradient before the down-projection: FP8
            "dispatch bwd": copies * 14336,  # the gradient back to the token owner: BF16
        }
    )


def test_sm_share_slows_overlapped_compute_only(tmp_path):
    from moesim.sim.simulate import simulate

    def experts_us(overlap: bool, sms: int) -> np.ndarray:
        sc = Scenario.model_validate(
            _scenario(
                model="DeepSeek-V3",
                tokens_per_device=128,
                mode="prefill",
                overlap=overlap,
                dispatcher={"preset": "deepep-normal", "sms": sms},
            )
        )
        run = simulate(sc, tmp_path).runs[0]
        return np.array([op.duration_us for op in run.program if op.phase == "experts"])

    assert experts_us(True, 20) == pytest.approx(experts_us(True, 0) * 132 / 112, rel=1e-12)
    # without overlap nothing runs beside the all-to-alls
    np.testing.assert_array_equal(experts_us(False, 20), experts_us(False, 0))


def test_group_limited_routing_keeps_each_token_within_its_groups():
    t = synthesize(num_experts=256, top_k=8, num_layers=1, num_tokens=4096, groups=(8, 4))
    ids = t.expert_ids[0]
    groups_per_token = np.array([np.unique(row // 32).size for row in ids])
    assert groups_per_token.max() == 4
    assert all(np.unique(row).size == 8 for row in ids)
    # no limit (M = G) is the unlimited sampler, draw for draw
    same = synthesize(num_experts=256, top_k=8, num_layers=1, num_tokens=512, groups=(8, 8))
    plain = synthesize(num_experts=256, top_k=8, num_layers=1, num_tokens=512)
    np.testing.assert_array_equal(same.expert_ids, plain.expert_ids)
    # more groups than an integer's bits: still within the limit
    many = synthesize(num_experts=140, top_k=2, num_layers=1, num_tokens=2000, groups=(70, 2))
    assert max(np.unique(row // 2).size for row in many.expert_ids[0]) == 2
    with pytest.raises(InputError, match="G dividing"):
        synthesize(num_experts=256, top_k=8, num_layers=1, num_tokens=8, groups=(8, 0))


def test_simulate_keeps_deepseek_v3_within_four_nodes(tmp_path):
    """EP64 on 8 nodes, contiguous placement: a node holds one of the 8 expert groups, so
    each token reaches at most 4 nodes and sends at most 4 copies off its own node
    under deepep-normal (one per destination node, uniform routing)."""
    from moesim.sim.prepare import prepare
    from moesim.sim.replay import route_layer_at

    sc = Scenario.model_validate(
        _scenario(cluster={"nodes": 8, "devices_per_node": 8}, tokens_per_device=32)
    )
    prep = prepare(sc, tmp_path)
    ids = prep.trace.expert_ids[0]
    assert max(np.unique(row // 32).size for row in ids) == 4
    copies = route_layer_at(prep, 0, 0).copies
    node = np.arange(64) // 8
    cross = copies[node[:, None] != node[None, :]].sum()
    # tokens reaching n nodes send n - 1 (own node reached) or n (not) copies across
    reach = np.array([np.unique(row // 32).size for row in ids])
    own = np.array([(i // 32) // 8 in set(row // 32) for i, row in enumerate(ids)])
    assert cross == (reach - own).sum()


def test_a2a_cli_dispatcher_and_model():
    out = subprocess.run(
        [sys.executable, "-m", "moesim", "a2a", "--hardware", "H800", "--ep", "16",
         "--tokens-per-rank", "64", "--model", "DeepSeek-V3", "--dispatcher",
         "deepep-normal", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["hidden"], r["top_k"], r["num_experts"], r["groups"]) == (7168, 8, 256, [8, 4])
    assert (r["dispatcher"], r["dedup"], r["dispatch_dtype"]) == ("deepep-normal", "node", "fp8")
    # 2 launches of 5 us + one round trip of the longest path, InfiniBand's 5 us
    assert r["fixed_us"] == 20.0
    bad = subprocess.run(
        [sys.executable, "-m", "moesim", "a2a", "--hardware", "H800", "--ep", "16",
         "--tokens-per-rank", "64", "--model", "DeepSeek-V3", "--dispatcher", "gloo"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "gloo" in bad.stderr


def test_fixed_cost_only_where_there_is_traffic():
    """Device 0 sends 5 copies to device 1 of one 3-device H100 node; device 2 neither sends
    nor receives: it pays no call. nccl-alltoallv: BF16 copies of FLAME-MoE-290M's 1,024
    channels (2,048 bytes), 2 launches of 5 us and one NVLink round trip of 3 us."""
    from moesim.costs.model import cost_model_for
    from moesim.costs.roofline import layer_costs
    from moesim.model.shapes import get_preset
    from moesim.sim.cluster import ClusterSpec
    from moesim.sim.program import build_program
    from moesim.topology import build_topology

    hw, shape = get_profile("H100-SXM"), get_preset("FLAME-MoE-290M")
    assert shape.d_model == 1024
    routed = routing_of([[0, 5, 0], [0, 0, 0], [0, 0, 0]], np.zeros((3, 22), dtype=int))
    costs = layer_costs(
        shape, hw, tokens=8, sequence_length=8, mode="prefill", dtype="bf16",
        model=cost_model_for(hw),
    )  # fmt: skip
    layer = shape.moe_layer_indices()[0]
    prog = build_program(
        shape, hw, ClusterSpec(3, 3, build_topology(hw, 3, 3)), {layer: routed}, costs,
        mode="prefill", tokens_per_device=8, sequence_length=8, dtype="bf16",
        dispatcher=get_dispatcher("nccl-alltoallv"), model=cost_model_for(hw),
    )  # fmt: skip
    (disp,) = [op for op in prog if op.name == f"L{layer} dispatch"]
    bw = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up * 1e3  # bytes/us
    one = 3.0 + 5 * 2048 / bw + (2 * 5.0 + 2 * 3.0)
    np.testing.assert_allclose(disp.duration_us, [one, one, 0.0], rtol=1e-12)


def test_a2a_without_traffic_makes_no_call():
    from moesim.sim.a2a import run_a2a

    r = run_a2a(hardware="H800", ep=1, tokens_per_rank=64, hidden=7168, topk=8, num_experts=256)
    assert (r["fixed_us"], r["dispatch_us"], r["dispatch_bytes"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"stragglers": {"jitter": float("inf")}}, "stragglers.jitter"),
        ({"stragglers": {"slow_devices": {0: float("nan")}}}, "stragglers.slow_devices.0"),
        ({"capacity": {"factor": float("inf")}}, "capacity.factor"),
        ({"seed": -1}, "seed"),
        ({"routing": {"synthetic": {"distribution": "zipf:nan"}}}, "routing.synthetic"),
    ],
)
def test_non_finite_numbers_and_negative_seeds_are_refused_where_they_enter(extra, field):
    with pytest.raises(ValueError) as err:
        Scenario.model_validate(_scenario(**extra))
    assert field in str(err.value)
