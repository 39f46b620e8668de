"""End-to-end checks of the simulator against answers computed independently."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from moesim.costs.model import cost_model_for
from moesim.costs.work import BenchShape
from moesim.hardware import get_profile
from moesim.model.shapes import ModelShape
from moesim.paths import scenarios_dir
from moesim.scenario import Scenario
from moesim.sim.simulate import simulate
from moesim.traces.store import RoutingTrace, write_trace
from tests.conftest import FLAME_TRACE, REFERENCE_TRACE

TINY_MODEL = {
    "name": "tiny",
    "num_layers": 2,
    "d_model": 256,
    "expert_d_ff": 512,
    "num_experts": 4,
    "top_k": 1,
    "attention": {"num_heads": 4},
    "vocab_size": 1000,
    "source": "test",
}


def _independent_device_loads(
    trace_dir, tokens_per_device: int, devices: int, cap_factor: float, num_experts: int
) -> np.ndarray:
    """(L, D) device loads from the raw Parquet files with plain Python loops."""
    loads = []
    parts = sorted(trace_dir.glob("layer=*/*.parquet"), key=lambda p: int(p.parent.name[6:]))
    for part in parts:
        rows = pq.read_table(part).sort_by("token").column("expert_ids").to_pylist()
        n = devices * tokens_per_device
        ids = [rows[i % len(rows)] for i in range(n)]  # the trace replayed cyclically
        k, e = len(ids[0]), num_experts
        cap = -(-int(cap_factor * n * k * 1000) // (e * 1000))  # ceil, exact for 1.25
        used = [0] * e
        dev_load = [0] * devices
        for rank in range(k):  # GShard priority: all first choices, then second, ...
            for tok in range(n):
                ex = ids[tok][rank]
                if used[ex] < cap:
                    used[ex] += 1
                    dev_load[ex // (e // devices)] += 1  # contiguous blocks of experts
        loads.append(dev_load)
    return np.array(loads)


def _check_counts(data: dict, trace_dir, tmp_path) -> None:
    sc = Scenario.model_validate(data)
    result = simulate(sc, tmp_path)
    m = result.runs[0].metrics
    moe = sorted(set(result.runs[0].layers["layer"]))
    fwd = m[(m["pass"] == "forward") & m["layer"].isin(moe)].sort_values(["layer", "device"])
    got = fwd["device_load"].to_numpy().reshape(len(moe), 16)
    expected = _independent_device_loads(
        trace_dir, sc.tokens_per_device, 16, sc.capacity.factor, result.shape.num_experts
    )
    np.testing.assert_array_equal(got, expected)
    # the per-layer processed balance (after drops) follows from those counts
    br = expected.max(axis=1) / expected.mean(axis=1)
    assert result.runs[0].summary["processed_balance"] == pytest.approx(br.tolist(), abs=1e-6)


CAPACITY_125 = {"factor": 1.25, "overflow": "drop"}  # these checks are about drops


def test_flame_device_counts_match_independent_count(flame_dict, tmp_path):
    _check_counts(flame_dict | {"capacity": CAPACITY_125}, FLAME_TRACE, tmp_path)


def test_demo_device_counts_match_independent_count(tmp_path):
    data = yaml.safe_load((scenarios_dir() / "demo.yaml").read_text())
    data["routing"] = {"trace": str(REFERENCE_TRACE)}
    # the independent count places experts contiguously and applies a capacity of 1.25
    data |= {"placement": "contiguous", "redundant_slots": 0, "capacity": CAPACITY_125}
    _check_counts(data, REFERENCE_TRACE, tmp_path)


def _trace(ids: np.ndarray, num_experts: int) -> RoutingTrace:
    return RoutingTrace(
        expert_ids=ids.astype(np.int32),
        gate_weights=np.ones(ids.shape, np.float32),
        steps=np.zeros(ids.shape[1], np.int32),
        layers=tuple(range(ids.shape[0])),
        num_experts=num_experts,
    )


def _scenario(trace_dir, tokens_per_device: int, **kw) -> Scenario:
    data = {
        "name": "t",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 4},
        "model": TINY_MODEL,
        "routing": {"trace": str(trace_dir)},
        "mode": "prefill",
        "tokens_per_device": tokens_per_device,
    } | kw
    return Scenario.model_validate(data)


def test_device_given_twice_the_tokens_is_the_straggler(tmp_path):
    # 4 devices x 4 experts (one each), 8 tokens per device; layer 1 sends expert 2
    # twice the tokens of each other expert
    t = 32
    even = np.tile(np.arange(4), t // 4)
    skew = np.array([0] * 6 + [1] * 6 + [2] * 12 + [3] * 8)
    write_trace(_trace(np.stack([even, skew])[:, :, None], 4), tmp_path / "tr")
    res = simulate(_scenario(tmp_path / "tr", 8), tmp_path)
    s = res.runs[0].summary
    assert s["layers"] == [0, 1]
    assert s["straggler_device"][1] == 2
    # at this size expert time hardly grows with tokens (launch-bound); what sets device 2
    # apart on the critical path is its dispatch, receiving 2,048 bytes where the mean
    # device receives 768
    assert s["straggler_cause"][1] == "receiving"
    assert res.runs[0].layers["straggler_op"].tolist()[1] == "L1 dispatch"
    # experts (one per device) get 6, 6, 12, 8 assignments: max / mean = 12 / 8
    assert s["expert_balance"] == pytest.approx([1.0, 1.5])
    assert s["routed_balance"] == pytest.approx([1.0, 1.5])
    assert s["processed_balance"] == pytest.approx([1.0, 1.5])  # dropless: nothing dropped
    assert s["dropless_capacity_factor"] == pytest.approx([1.0, 1.5])
    fwd = res.runs[0].metrics.query("layer == 1 and `pass` == 'forward'")
    exp_us = fwd.sort_values("device")["expert_us"].to_numpy()
    # each device's one expert as one grouped call of 6, 6, 12 and 8 tokens; golden
    # figures of the H100 cost model (launch-bound: 12 tokens cost 0.008 µs more than 6)
    model = cost_model_for(res.hw)
    one = BenchShape.from_model(res.shape, local_experts=1)
    calls = model.time_us("expert_ffn_grouped", one, np.array([6.0, 6.0, 12.0, 8.0]), "bf16")
    np.testing.assert_allclose(exp_us, calls, rtol=1e-12)
    np.testing.assert_allclose(exp_us, [5.560641, 5.560641, 5.568888, 5.563381], atol=1e-6)


def test_tokens_per_s_counts_processed_assignments_only(tmp_path):
    # 4 devices x 8 tokens, top-1, capacity factor 1: ceil(1.0 * 32 / 4) = 8 per slot.
    # Layer 0 is even (8 each, nothing dropped); layer 1 sends 12 to expert 2, which keeps 8
    # and drops 4. Processed: (32 + 28) of 64 assignments, so 32 × 60/64 = 30 tokens a step.
    t = 32
    even = np.tile(np.arange(4), t // 4)
    skew = np.array([0] * 6 + [1] * 6 + [2] * 12 + [3] * 8)
    write_trace(_trace(np.stack([even, skew])[:, :, None], 4), tmp_path / "tr")
    sc = _scenario(tmp_path / "tr", 8, capacity={"factor": 1.0})
    s = simulate(sc, tmp_path).runs[0].summary
    assert (s["assignments"], s["dropped"], s["slot_capacity"]) == (64, 4, 8)
    assert s["tokens_per_s"] == pytest.approx(30 / (s["step_time_us"] * 1e-6), rel=1e-12)
    dropless = simulate(_scenario(tmp_path / "tr", 8), tmp_path).runs[0].summary
    assert dropless["tokens_per_s"] == pytest.approx(
        32 / (dropless["step_time_us"] * 1e-6), rel=1e-12
    )


def test_uniform_routing_gives_closed_form_dispatch(tmp_path):
    # each device's 4 tokens go one to each expert (one expert per device), so every
    # device sends exactly one token to every other device
    ids = np.tile(np.arange(4), 4)[None, :, None]
    write_trace(_trace(np.concatenate([ids, ids]), 4), tmp_path / "tr")
    res = simulate(_scenario(tmp_path / "tr", 4), tmp_path)
    hw = get_profile("H100-SXM")
    shape = ModelShape.model_validate(TINY_MODEL)
    # the default dispatcher on an NVIDIA GPU is deepep-normal: FP8 dispatch with one fp32
    # scale per 128 channels (256 + 2 x 4 = 264 bytes a copy), BF16 combine (512 bytes),
    # and a fixed cost per call of 2 launches (5 us each) + 1 round trip of NVLink's 3 us
    fp8, bf16 = shape.d_model * 1 + shape.d_model / 128 * 4, shape.d_model * 2
    assert (fp8, bf16) == (264, 512)
    fixed = 2 * hw.kernel_launch_us + 2 * hw.scale_up.latency_us
    assert fixed == 16.0
    bw_up = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up * 1e3
    m = res.runs[0].metrics.query("layer == 0 and `pass` == 'forward'")
    for col, per_peer in (("dispatch_us", fp8), ("combine_us", bf16)):
        expected = hw.scale_up.latency_us + 3 * per_peer / bw_up + fixed
        assert m[col].to_numpy() == pytest.approx(np.full(4, expected), rel=1e-12)
    assert (m["wait_us"] == 0).all()
    # the same traffic through NCCL's all-to-all-v: BF16 both ways, the same fixed cost
    nccl = simulate(_scenario(tmp_path / "tr", 4, dispatcher="nccl-alltoallv"), tmp_path)
    m = nccl.runs[0].metrics.query("layer == 0 and `pass` == 'forward'")
    expected = hw.scale_up.latency_us + 3 * bf16 / bw_up + fixed
    assert m["dispatch_us"].to_numpy() == pytest.approx(np.full(4, expected), rel=1e-12)


def test_training_has_backward_and_allreduce(flame_dict, tmp_path):
    sc = Scenario.model_validate(flame_dict | {"mode": ["training", "prefill"]})
    res = simulate(sc, tmp_path)
    train, prefill = res.runs
    assert set(train.metrics["pass"]) == {"forward", "backward"}
    assert set(prefill.metrics["pass"]) == {"forward"}
    # dense gradients of FLAME-MoE-290M: 1,300,024,320 parameters less 8 MoE layers x 64
    # experts x 2,162,688 = 192,728,064, in bf16 385,456,128 bytes, reduced in 4 buckets
    # (40 M parameters each at least: lm head 51,511,296; 5 MoE layers x 8,587,264 =
    # 42,936,320; 3 more + the dense layer's 21,006,336 = 46,768,128; embeddings and
    # final norm 51,512,320). Ring over 16 devices on 2 nodes: 2 x 15/16 of the bytes at
    # 42,500 bytes/us (50 GB/s x 0.85) plus 30 hops of 5 us per bucket:
    # 1.875 x 385,456,128 / 42,500 + 4 x 150 = 17,005.417 + 600 = 17,605.417 us
    assert train.summary["breakdown_us"]["allreduce_us"] == pytest.approx(17_605.417, abs=1e-3)
    b = dict(train.summary["breakdown_us"])
    # the gradient all-reduce buckets run beside the backward pass: part of their time is
    # hidden under it (reported as overlapped), the rest ends the step
    overlapped = b.pop("overlapped_us")
    assert 0 < overlapped <= b["allreduce_us"]
    assert sum(b.values()) - overlapped == pytest.approx(train.summary["step_time_us"], rel=1e-9)
    # the backward pass costs twice the forward: experts, attention, router
    ops = {op.name: op for op in train.program}
    for name in ("L1 experts", "L1 attention"):
        assert ops[f"{name} bwd"].duration_us.tolist() == (2 * ops[name].duration_us).tolist()
    # each bucket starts once every device has done the backward op that fills it and the
    # bucket before it is reduced (its own stream), and takes the ring's closed-form time
    rec, prog = train.records[-1], train.program
    buckets = [i for i, op in enumerate(prog) if op.category == "allreduce"]
    assert len(buckets) == 4 and buckets[-1] == len(prog) - 1
    prev_end = 0.0
    for i in buckets:
        (fill,) = prog[i].after
        assert prog[fill].pass_ == "backward" and prog[fill].category != "allreduce"
        assert rec.start_us[i].tolist() == [max(rec.end_us[fill].max(), prev_end)] * 16
        prev_end = rec.end_us[i].max()
    # the buckets queue back to back from the first (the lm head's, 103,022,592 bytes:
    # 1.875 x 103,022,592 / 42,500 + 150 = 4,695.114 us), so the step ends 17,605.417 us
    # after the lm head's backward
    first = buckets[0]
    assert (rec.end_us[first] - rec.start_us[first]).tolist() == pytest.approx(
        [4_695.114] * 16, abs=1e-3
    )
    assert train.summary["step_time_us"] == pytest.approx(
        rec.end_us[prog[first].after[0]].max() + 17_605.417, abs=1e-3
    )


def test_capacity_drops_match_definition(flame_dict, tmp_path):
    sc = Scenario.model_validate(
        flame_dict | {"mode": "prefill", "tokens_per_device": 128, "capacity": CAPACITY_125}
    )
    res = simulate(sc, tmp_path)
    s = res.runs[0].summary
    assert s["slot_capacity"] == 240  # ceil(1.25 * 2048 * 6 / 64 physical slots)
    # tokens/s count processed assignments only: tokens × (1 - drop rate) / step time
    processed = 2048 * (s["assignments"] - s["dropped"]) / s["assignments"]
    assert s["tokens_per_s"] == pytest.approx(processed / (s["step_time_us"] * 1e-6), rel=1e-12)

    def variant(capacity):
        data = flame_dict | {"mode": "prefill", "tokens_per_device": 128, "capacity": capacity}
        return simulate(Scenario.model_validate(data), tmp_path).runs[0].summary

    assert variant({"factor": None})["drop_rate"] == 0.0
    assert 0 < s["drop_rate"] < 0.05
    rr = variant({"factor": 1.25, "overflow": "reroute"})
    assert rr["drop_rate"] < s["drop_rate"] and rr["rerouted"] > 0


def test_decode_mode_runs(flame_dict, tmp_path):
    sc = Scenario.model_validate(flame_dict | {"mode": "decode", "tokens_per_device": 64})
    s = simulate(sc, tmp_path).runs[0].summary
    assert s["mode"] == "decode" and s["step_time_us"] > 0


def test_synthetic_routing_is_seeded(tmp_path):
    base = {
        "name": "syn",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 4},
        "model": TINY_MODEL,
        "mode": "prefill",
        "tokens_per_device": 64,
    }

    def run(seed, scenario_seed=0):
        syn = {"distribution": "zipf:1.0"} | ({} if seed is None else {"seed": seed})
        sc = Scenario.model_validate(base | {"routing": {"synthetic": syn}, "seed": scenario_seed})
        return simulate(sc, tmp_path).runs[0].summary["routed_balance"]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(None, scenario_seed=1) == run(1)  # the scenario's seed is the default


def test_network_options_flow_tier_and_dedup(flame_dict, tmp_path):
    base = flame_dict | {"mode": "prefill", "tokens_per_device": 128}

    def run(network, dispatcher="nccl-alltoallv"):
        sc = Scenario.model_validate(base | {"network": network, "dispatcher": dispatcher})
        return simulate(sc, tmp_path).runs[0]

    analytic = run({"tier": "analytic"})
    flow = run({"tier": "flow"})
    # auto keeps a flow per device pair at 16 devices, and says so
    assert flow.summary["granularity"] == "device" and analytic.summary["granularity"] is None
    from moesim.report.summary import header_line

    sc = Scenario.model_validate(
        base | {"network": {"tier": "flow", "granularity": "node"}, "dispatcher": "nccl-alltoallv"}
    )
    res = simulate(sc, tmp_path)
    assert res.runs[0].summary["granularity"] == "node"
    assert header_line(res).endswith(
        "dropless (unlimited capacity); flow network, node flows; "
        "nccl-alltoallv dispatcher, a copy per (token, expert)"
    )
    node = run({"tier": "flow"}, {"preset": "nccl-alltoallv", "dedup": "node"})
    # the flow tier never beats the port bound on this non-blocking fabric: a device's
    # dispatch ends at least its port-limited time after the first of its peers was ready
    rec = flow.records[0]
    for i, op in enumerate(flow.program):
        if op.category == "dispatch":
            ready = rec.start_us[i] - rec.wait_us[i]
            assert (rec.end_us[i] - ready.min() >= op.port_limited_us * (1 - 1e-9)).all()
    # one copy per (token, node) moves fewer bytes than one per (token, expert)
    assert node.summary["cross_node_bytes"] < 0.8 * flow.summary["cross_node_bytes"]
    assert node.summary["step_time_us"] < flow.summary["step_time_us"]
    # routing (and so balance) does not depend on the network model
    for key in ("expert_balance", "routed_balance", "processed_balance"):
        assert node.summary[key] == analytic.summary[key]


def test_oversubscribed_fabric_slows_the_step(flame_dict, tmp_path):
    base = flame_dict | {"mode": "prefill", "tokens_per_device": 128}

    def step(network):
        sc = Scenario.model_validate(
            base | {"network": network, "dispatcher": "nccl-alltoallv"}  # every copy sent
        )
        return simulate(sc, tmp_path).runs[0].summary["step_time_us"]

    full = step({"tier": "flow", "nodes_per_leaf": 1})
    thin = step({"tier": "flow", "nodes_per_leaf": 1, "oversubscription": 4})
    assert thin > full * 1.5


def test_two_microbatch_overlap(flame_dict, tmp_path):
    # the mechanics of overlap, without what a dispatcher charges it: no SMs held by the
    # all-to-alls (test_sm_share_slows_overlapped_compute has those), and no fixed cost
    # per call, which two microbatches pay twice (this small model's ~20 us a call would
    # eat the gain)
    base = flame_dict | {
        "mode": "prefill",
        "capacity": {"factor": None},
        "dispatcher": {"preset": "deepep-normal", "sms": 0, "launches": 0, "syncs": 0},
    }

    def run(overlap):
        sc = Scenario.model_validate(base | {"overlap": overlap})
        return simulate(sc, tmp_path).runs[0]

    seq, ov = run(False), run(True)
    # the same tokens are routed, in two halves
    fwd = "`pass` == 'forward' and layer >= 1"
    np.testing.assert_array_equal(
        seq.metrics.query(fwd)["device_load"].to_numpy(),
        ov.metrics.query(fwd)["device_load"].to_numpy(),
    )
    assert ov.summary["step_time_us"] < seq.summary["step_time_us"]
    b = ov.summary["breakdown_us"]
    assert b["overlapped_us"] > 0
    busy = sum(v for k, v in b.items() if k not in ("wait_us", "overlapped_us"))
    assert busy + b["wait_us"] - b["overlapped_us"] == pytest.approx(ov.summary["step_time_us"])
    names = {op.name.split(" ", 1)[0] for op in ov.program}
    assert names == {"mb0", "mb1"}
    with pytest.raises(ValueError, match="even"):
        Scenario.model_validate(base | {"overlap": True, "tokens_per_device": 129})


def _synthetic(level: str, **kw) -> Scenario:
    data = {
        "name": f"{level}-level",
        "hardware": "H800",
        "cluster": {"nodes": 4, "devices_per_node": 8},
        "model": TINY_MODEL | {"num_experts": 64, "top_k": 6, "num_layers": 3},
        "routing": {"synthetic": {"distribution": "zipf:1.0", "seed": 5, "level": level}},
        "tokens_per_device": 2048,
        "capacity": {"factor": 1.1},
        "mode": "prefill",
        "dispatcher": "nccl-alltoallv",
    }
    return Scenario.model_validate(data | kw)


def test_count_level_routing_agrees_with_token_level(tmp_path):
    """Drawing per-device counts instead of per-token choices keeps the loads, drops and
    step time of the same synthetic routing law (its two draws differ only by chance).
    With capacity, which devices lose the dropped assignments differs (device order
    against GShard's rank-then-token order), so step times are compared without it."""
    tok = simulate(_synthetic("token"), tmp_path).runs[0].summary
    cnt = simulate(_synthetic("count"), tmp_path).runs[0].summary
    for a, b in zip(tok["processed_balance"], cnt["processed_balance"], strict=True):
        assert b == pytest.approx(a, rel=0.02)
    assert cnt["drop_rate"] == pytest.approx(tok["drop_rate"], abs=0.005)
    assert cnt["assignments"] == pytest.approx(tok["assignments"], rel=0.01)
    free = {"capacity": {"factor": None}}
    tok = simulate(_synthetic("token", **free), tmp_path).runs[0].summary
    cnt = simulate(_synthetic("count", **free), tmp_path).runs[0].summary
    assert cnt["step_time_us"] == pytest.approx(tok["step_time_us"], rel=0.01)
    for a, b in zip(tok["processed_balance"], cnt["processed_balance"], strict=True):
        assert b == pytest.approx(a, rel=0.02)


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("capacity.overflow", {"capacity": {"factor": 1.0, "overflow": "reroute"}}),
        ("dispatcher.dedup", {"dispatcher": {"preset": "nccl-alltoallv", "dedup": "node"}}),
        ("dispatcher.dedup", {"dispatcher": "auto"}),  # deepep-normal on NVIDIA: dedups
    ],
)
def test_count_level_routing_refuses_token_policies(tmp_path, field, kw):
    from moesim.errors import InputError

    with pytest.raises(InputError) as err:
        simulate(_synthetic("count", **kw), tmp_path, "s.yaml")
    assert err.value.field == field


def test_layers_name_their_busiest_fabric_link(tmp_path):
    """On 4 nodes of 8, some of every layer's dispatch crosses NICs (50 GB/s against
    NVLink's 450), so the bottleneck link of each layer is a NIC link."""
    run = simulate(_synthetic("token"), tmp_path).runs[0]
    for r in run.layers.to_dict("records"):
        assert "leaf" in r["busiest_link"] and "device" in r["busiest_link"], r["busiest_link"]
        assert r["busiest_link_bytes"] > 0
        hw = get_profile("H800")
        bw = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
        assert r["busiest_link_us"] == pytest.approx(r["busiest_link_bytes"] / bw)


def test_dropless_runs_report_the_padding_a_capacity_factor_would_need(tmp_path):
    # 4 devices x 8 tokens, top-1, one expert a device: layer 1 routes 12 to expert 2 against
    # a mean of 32 / 4 = 8 a slot, so a padded kernel needs factor 12 / 8 = 1.5
    from moesim.costs.memory import memory_per_device
    from moesim.hardware import get_profile

    even = np.tile(np.arange(4), 8)
    skew = np.array([0] * 6 + [1] * 6 + [2] * 12 + [3] * 8)
    write_trace(_trace(np.stack([even, skew])[:, :, None], 4), tmp_path / "tr")
    res = simulate(_scenario(tmp_path / "tr", 8), tmp_path)
    s = res.runs[0].summary
    assert s["dropless_capacity_factor"] == [1.0, 1.5]
    assert s["padded_capacity_factor"] == 1.5
    want = memory_per_device(
        res.shape, num_devices=4, mode="prefill", tokens_per_device=8, sequence_length=4096,
        precision="bf16", capacity_factor=1.5,
        hbm_bytes=get_profile("H100-SXM").memory.hbm_bytes, expert_slots=1,
    )  # fmt: skip
    assert s["padded_memory_per_device_bytes"] == want.total_bytes


def test_phases_of_two_microbatches_have_keys_of_their_own(flame_dict, tmp_path):
    """Ops carry their layer, pass, phase and microbatch as fields: with overlap every
    (step, microbatch, pass, layer, device, phase) row of the phases table is one op."""
    from moesim.report.frames import phases_frame

    sc = Scenario.model_validate(flame_dict | {"mode": "training", "overlap": True})
    res = simulate(sc, tmp_path)
    ph = phases_frame(res)
    keys = ["mode", "step", "microbatch", "pass", "layer", "device", "phase"]
    assert not ph.duplicated(keys).any()
    assert sorted(ph["microbatch"].unique().tolist()) == [0, 1]
    experts = ph[(ph["phase"] == "experts") & (ph["layer"] == 1) & (ph["device"] == 0)]
    assert experts["microbatch"].tolist() == [0, 1]
    run = res.runs[0]
    assert {(op.microbatch, op.phase) for op in run.program if op.layer == 1} >= {
        (0, "dispatch"), (1, "dispatch"), (0, "combine bwd"), (1, "combine bwd"),
    }  # fmt: skip


def test_progress_counts_every_routed_layer_step(tmp_path):
    """The demo scenario: 2 modes x 1 step x 1 microbatch x 4 MoE layers = 8 layer steps,
    each reported once; and a synthetic trace's progress adds up to its tokens."""
    from moesim.paths import scenarios_dir
    from moesim.scenario import load_scenario
    from moesim.sim.prepare import prepare
    from moesim.sim.simulate import routed_layer_steps, simulate_prepared
    from moesim.traces.synthetic import synth_to_store

    scenario, base = load_scenario(scenarios_dir() / "demo.yaml")
    prep = prepare(scenario, base, "demo")
    assert routed_layer_steps(prep) == 2 * 1 * 1 * 4
    calls: list[int] = []
    res = simulate_prepared(prep, "demo", progress=calls.append)
    assert calls == [1] * 8
    assert res.inputs["source"] == "demo"

    chunks: list[int] = []
    synth_to_store(tmp_path / "t", num_experts=8, top_k=2, num_layers=2, num_tokens=1000,
                   progress=chunks.append)  # fmt: skip
    assert sum(chunks) == 1000


def test_layer_sources_by_hand():
    from moesim.errors import InputError
    from moesim.sim.prepare import layer_sources

    # a trace of layers 2, 3, 4 on a model of 5 MoE layers
    assert layer_sources("cycle", (2, 3, 4), 5, "m") == [0, 1, 2, 0, 1]
    assert layer_sources([4, 2], (2, 3, 4), 2, "m") == [2, 0]
    assert layer_sources(None, (2, 3, 4), 3, "m") == [0, 1, 2]
    assert layer_sources(None, (2, 3, 4), 5, "m") is None
    with pytest.raises(InputError, match="lists 2 trace layers; model m has 3") as err:
        layer_sources([2, 3], (2, 3, 4), 3, "m")
    assert (err.value.field, err.value.value) == ("routing.layer_map", 2)
    with pytest.raises(InputError, match="lacks") as err:
        layer_sources([2, 9], (2, 3, 4), 2, "m")
    assert err.value.value == 9


def test_a_trace_with_fewer_layers_cycles_over_a_deeper_model(tmp_path, write_scenario):
    """FLAME-MoE-290M's 8 trace layers (2..9) on DeepSeekMoE-16B's 27 MoE layers (64
    experts, top-6 too): MoE layer i replays trace layer 2 + i mod 8, and says so."""
    from moesim.report.summary import header_line
    from tests.conftest import assert_one_line_error
    from tests.conftest import run_moesim as moesim

    base = {
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 8},
        "model": "DeepSeekMoE-16B",
        "routing": {"trace": str(FLAME_TRACE)},
        "mode": "prefill",
        "tokens_per_device": 256,
        "sequence_length": 256,
    }
    refused = moesim("simulate", str(write_scenario(base, "plain.yaml")), "--out",
                     str(tmp_path / "r0"))  # fmt: skip
    assert_one_line_error(refused, "trace has 8 MoE layers", "27", "routing.layer_map")

    sc = Scenario.model_validate(base | {"routing": base["routing"] | {"layer_map": "cycle"}})
    res = simulate(sc, tmp_path)
    assert res.inputs["trace_layers"] == [2 + i % 8 for i in range(27)]
    summary = res.runs[0].summary
    assert summary["layer_map"] == "cycle"
    assert "trace layers mapped: cycle" in header_line(res)
    layers = res.runs[0].layers.set_index("layer")
    moe = res.inputs["moe_layers"]
    # the same trace layer, the same contiguous placement: the same expert balance
    for i in range(8, 27):
        assert layers.loc[moe[i], "expert_balance"] == layers.loc[moe[i % 8], "expert_balance"]


def test_steps_stack_into_one_numbered_frame(tmp_path):
    """Two steps: the per-device metrics of both, numbered 0 .. n-1 in one frame."""
    t = 32
    even = np.tile(np.arange(4), t // 4)
    write_trace(_trace(np.stack([even, even])[:, :, None], 4), tmp_path / "tr")
    m = simulate(_scenario(tmp_path / "tr", 8, steps=2), tmp_path).runs[0].metrics
    assert sorted(set(m["step"])) == [0, 1]
    assert m.index.tolist() == list(range(len(m)))
    # assignments are whole numbers, on the routed layers and the others (layer -1) alike
    assert -1 in set(m["layer"])
    assert m["device_load"].dtype == np.int64 and m["routed_load"].dtype == np.int64


def test_prepare_refusals_name_the_field_and_value(tmp_path):
    """prepare's one-line refusals: count-level routing with rerouting (no dispatcher
    hint), or under a de-duplicating dispatcher (the hint names it); a straggler outside
    the cluster (its device named); a layer map of the wrong length (the model named)."""
    from moesim.errors import InputError
    from moesim.sim.prepare import prepare

    base = {
        "name": "r",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 4},
        "model": TINY_MODEL,
        "routing": {"synthetic": {"level": "count"}},
        "mode": "prefill",
        "tokens_per_device": 8,
        "dispatcher": "nccl-alltoallv",
    }

    def refused(**kw):
        with pytest.raises(InputError) as err:
            prepare(Scenario.model_validate(base | kw), tmp_path, "s.yaml")
        return err.value

    err = refused(capacity={"factor": 1.0, "overflow": "reroute"})
    assert (err.field, err.value) == ("capacity.overflow", "reroute")
    assert err.message == "count-level routing supports capacity.overflow drop only"
    err = refused(dispatcher="deepep-normal")
    assert (err.field, err.value) == ("dispatcher.dedup", "node")
    assert err.message.endswith(
        "set dispatcher: {preset: deepep-normal, dedup: none} to count every copy)"
    )
    err = refused(stragglers={"slow_devices": {9: 2.0}})
    assert (err.field, err.value) == ("stragglers", 9)
    flame = {
        "model": "DeepSeekMoE-16B",
        "cluster": {"nodes": 1, "devices_per_node": 8},
        "routing": {"trace": str(FLAME_TRACE), "layer_map": [2, 3]},
        "tokens_per_device": 256,
        "sequence_length": 256,
    }
    err = refused(**flame)
    assert err.message == "lists 2 trace layers; model DeepSeekMoE-16B has 27 MoE layers"


def test_expert_slots_that_fit_follow_the_precision(tmp_path):
    """Mixtral-8x7B's 8 experts on one H100: in bf16 only 5 expert slots per MoE layer fit
    (placement refused), in fp8 11 do, so all 8 are placed."""
    from moesim.errors import InputError
    from moesim.sim.prepare import prepare

    base = {
        "name": "m",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 1},
        "model": "Mixtral-8x7B",
        "routing": {"synthetic": {"level": "count"}},
        "mode": "prefill",
        "tokens_per_device": 64,
        "placement": "greedy",
        "dispatcher": "nccl-alltoallv",
    }
    prep = prepare(Scenario.model_validate(base | {"precision": "fp8"}), tmp_path, "s.yaml")
    assert prep.placement.slots.shape == (32, 1, 8)
    with pytest.raises(InputError, match="8 expert slots per device exceed the 5 that fit"):
        prepare(Scenario.model_validate(base), tmp_path, "s.yaml")
