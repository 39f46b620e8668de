"""Capacity planner: memory answer by hand, minimal device counts, CLI answers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moesim.plan.capacity import PlanRequest, cluster_sizes, plan_capacity
from moesim.plan.commands import expand_multi_value_options
from tests.conftest import assert_one_line_error, run_moesim
from tests.test_memory import DENSE, EXPERT, KV_PER_TOKEN

HBM_H100 = 80e9


def test_cluster_sizes_follow_the_node_and_the_placement():
    assert cluster_sizes(8, 8, 40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert cluster_sizes(256, 8, 1024) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024]
    assert cluster_sizes(64, 4, 16) == [1, 2, 4, 8, 16]
    # with redundant slots: experts + redundant slots a multiple of the devices
    assert cluster_sizes(8, 8, 40, redundant=4) == [1, 2, 4]  # 12 slots
    assert cluster_sizes(256, 8, 1024, redundant=32) == [
        1,
        2,
        4,
        8,
        16,
        24,
        32,
        48,
        72,
        96,
        144,
        288,
    ]  # fmt: skip  (288 slots)


def _padding(slot_loads: np.ndarray) -> float:
    """The routing's dropless capacity factor for top-1 tokens loading each slot (expert
    ``i`` alone in slot ``i``, device-major) as ``slot_loads`` (D, S) says."""
    from moesim.placement.base import Placement
    from moesim.sim.routing import route_layer

    d, s = slot_loads.shape
    p = Placement(np.arange(d * s, dtype=np.int32).reshape(1, d, s), d * s)
    table, count = p.replicas(0)
    ids = np.repeat(np.arange(d * s), slot_loads.ravel())[:, None]
    origin = np.zeros(ids.shape[0], dtype=np.int32)
    r = route_layer(ids, origin, p.slots[0], table, count, num_experts=d * s, devices_per_node=d)
    return r.dropless_capacity_factor


def test_padding_factor_is_the_largest_slot_load_over_the_mean():
    layer_a = np.array([[4, 2], [1, 1]])  # mean 2, max 4: factor 2
    layer_b = np.array([[3, 3], [3, 3]])  # even: factor 1
    layer_c = np.array([[5, 0, 1], [0, 0, 0]])  # mean 1, max 5: factor 5
    assert max(_padding(layer_a), _padding(layer_b)) == 2.0
    assert max(_padding(layer_b), _padding(layer_c), _padding(layer_a)) == 5.0
    assert _padding(np.zeros((2, 2), dtype=np.int64)) == 1.0  # no tokens: no padding


def test_mixtral_on_h100_memory_answer_matches_hand_computation():
    req = PlanRequest(model="Mixtral-8x7B", hardware=("H100-SXM",), tokens_per_s=30_000)
    (plan,) = plan_capacity(req)
    # by hand, bf16, 64 decode sequences of 4,096 tokens: weights + KV cache alone
    kv = 64 * 4096 * KV_PER_TOKEN
    two = 2 * DENSE + 2 * 32 * 4 * EXPERT + kv  # 2 devices: 4 experts per MoE layer each
    four = 2 * DENSE + 2 * 32 * 2 * EXPERT + kv  # 4 devices: 2 experts each
    act = 64 * (15 * 4096 + 4 * 8 + 1.0 * 2 * 2 * (2 * 4096 + 3 * 14336))  # dropless: top-2
    assert two > HBM_H100 and four + act < HBM_H100
    assert plan.min_devices_memory == 4
    # throughput answer: met there, not at the next smaller size the search can pick
    d = plan.min_devices_throughput
    assert d is not None and plan.evaluations[d].tokens_per_s >= 30_000
    sizes = cluster_sizes(8, 8, 4096)
    smaller = sizes[sizes.index(d) - 1]
    assert smaller >= 4 and plan.evaluations[smaller].tokens_per_s < 30_000
    rec = plan.recommended
    # no drop budget: dropless, nothing dropped, no capacity factor tried
    assert rec is not None and rec.capacity_factor is None and rec.drop_rate == 0.0
    assert rec.drop_rates == {} and rec.result.scenario.capacity.factor is None
    assert rec.placement == "contiguous"
    assert plan.min_devices_slo is None  # no latency target given
    a = plan.answer(req)
    assert a["dropless"] is True and a["drop_rate"] == 0.0 and a["max_drop_rate"] == 0.0
    assert a["padding_factor"] == rec.padding_factor >= 1.0


def test_dropless_padding_is_reported_with_its_memory():
    from moesim.costs.memory import memory_per_device
    from moesim.hardware import get_profile
    from moesim.model.shapes import get_preset
    from moesim.sim.prepare import prepare
    from moesim.sim.replay import route_step

    req = PlanRequest(
        model="Mixtral-8x7B", hardware=("H100-SXM",), tokens_per_s=1.0, nodes=1,
        distribution="zipf:1.2",
    )  # fmt: skip
    (plan,) = plan_capacity(req)
    rec = plan.recommended
    assert rec is not None and rec.capacity_factor is None and rec.drop_rate == 0.0
    prep = prepare(rec.result.scenario, Path("."))
    per_layer = [lr.expert_tokens for lr in route_step(prep, 0).values()]
    worst = max(float(t.max() / t.mean()) for t in per_layer)
    assert rec.padding_factor == pytest.approx(worst, rel=1e-12) and worst > 1.0
    mem = memory_per_device(
        get_preset("Mixtral-8x7B"), num_devices=8, mode="decode", tokens_per_device=64,
        sequence_length=4096, precision="bf16", capacity_factor=worst,
        hbm_bytes=get_profile("H100-SXM").memory.hbm_bytes, expert_slots=1,
    )  # fmt: skip
    assert rec.padded_memory_bytes == pytest.approx(mem.total_bytes, rel=1e-12)


def test_drop_budget_picks_the_smallest_factor_within_it_where_faster():
    req = PlanRequest(
        model="Mixtral-8x7B", hardware=("H100-SXM",), tokens_per_s=1.0, nodes=1,
        distribution="zipf:0.5", max_drop_rate=0.05,
    )  # fmt: skip
    (plan,) = plan_capacity(req)
    rec = plan.recommended
    assert rec is not None
    tried = list(rec.drop_rates)
    assert tried == list(req.capacity_factors[: len(tried)])
    within = tried[-1]  # the smallest factor within the budget, found on the routing
    assert rec.drop_rates[within] <= 0.05 and all(rec.drop_rates[c] > 0.05 for c in tried[:-1])
    # it was simulated, and kept only if faster than dropless: here dropless is as fast
    assert list(rec.factor_tokens_per_s) == [within]
    assert rec.capacity_factor is None and rec.drop_rate == 0.0
    assert rec.tokens_per_s >= rec.factor_tokens_per_s[within]
    # tokens/s count processed assignments only (all of them, dropless)
    s = rec.run.summary
    assert rec.tokens_per_s == pytest.approx(8 * 64 / (s["step_time_us"] * 1e-6), rel=1e-12)
    # a skew no factor of the ladder brings within the budget (it needs 3.03): dropless
    (plan,) = plan_capacity(replace(req, distribution="zipf:1.2"))
    rec = plan.recommended
    assert rec is not None and rec.capacity_factor is None and rec.drop_rate == 0.0
    assert list(rec.drop_rates) == list(req.capacity_factors)
    assert all(rate > 0.05 for rate in rec.drop_rates.values())
    assert rec.padding_factor == pytest.approx(3.03125)


def test_fixed_nodes_and_redundant_slots():
    req = PlanRequest(
        model="Mixtral-8x7B", hardware=("H100-SXM",), tokens_per_s=0.0, nodes=1, redundant=8,
        distribution="zipf:1.2",
    )  # fmt: skip
    (plan,) = plan_capacity(req)
    assert plan.fixed_devices == 8 and list(plan.evaluations) == [8]
    ev = plan.evaluations[8]
    assert set(ev.placements_tokens_per_s) == {"contiguous", "eplb-global"}
    # the planned placement got the 8 redundant slots (2 per device), contiguous none
    assert ev.redundant_slots == (8 if ev.placement == "eplb-global" else 0)
    assert ev.result.scenario.redundant_slots == ev.redundant_slots
    a = plan.answer(req)
    assert a["fixed_devices"] == 8 and a["recommended_devices"] == 8 and a["nodes"] == 1
    # memory: 8 devices of 2 slots each fit (1 slot: 4 devices already do)
    assert a["min_devices_memory"] == 8 and a["memory_fits"] is True


def test_redundant_slots_count_in_the_memory_answer():
    # 8 experts + 4 redundant slots: 1, 2 or 4 devices; 4 devices hold 3 slots per layer
    req = PlanRequest(model="Mixtral-8x7B", hardware=("H100-SXM",), tokens_per_s=1e12,
                      redundant=4, max_devices=8)  # fmt: skip
    (plan,) = plan_capacity(req)
    kv = 64 * 4096 * KV_PER_TOKEN
    act = 64 * (15 * 4096 + 4 * 8 + 1.0 * 2 * 2 * (2 * 4096 + 3 * 14336))
    assert 2 * DENSE + 2 * 32 * 3 * EXPERT + kv + act < HBM_H100
    assert 2 * DENSE + 2 * 32 * 6 * EXPERT + kv > HBM_H100  # 2 devices: 6 slots each
    assert plan.min_devices_memory == 4
    assert plan.min_devices_throughput is None  # 1e12 tokens/s is out of reach
    assert plan.recommended is None


def test_latency_target_and_cost():
    req = PlanRequest(
        model="Mixtral-8x7B",
        hardware=("B200",),
        tokens_per_s=20_000,
        latency_slo_ms=12.0,
        prices_per_device_hour=(5.0,),
    )
    (plan,) = plan_capacity(req)
    a = plan.answer(req)
    assert a["min_devices_slo"] is not None
    assert a["min_devices_slo"] >= a["min_devices_throughput"] >= a["min_devices_memory"]
    rec = plan.evaluations[a["min_devices_slo"]]
    assert rec.step_time_us <= 12_000 and rec.tokens_per_s >= 20_000
    cost = rec.num_devices * 5.0 / (rec.tokens_per_s * 3600) * 1e6
    assert a["cost_per_million_tokens"] == pytest.approx(cost)


def test_several_values_after_one_option():
    args = ["plan-capacity", "--hardware", "A", "B", "--price-per-device-hour", "1", "2", "--json"]
    assert expand_multi_value_options(args) == [
        "plan-capacity",
        "--hardware",
        "A",
        "--hardware",
        "B",
        "--price-per-device-hour",
        "1",
        "--price-per-device-hour",
        "2",
        "--json",
    ]


def _plan_cli(tmp_path, model, *extra):
    out = tmp_path / model
    proc = run_moesim(
        "plan-capacity", "--model", model, "--hardware", "H100-SXM", "B200",
        "--out", str(out), "--json", *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


def test_cli_json_answers_mixtral_on_h100_and_b200(tmp_path):
    answer, out = _plan_cli(
        tmp_path, "Mixtral-8x7B", "--tokens-per-s", "30000", "--latency-slo-ms", "25",
        "--price-per-device-hour", "3", "6",
    )  # fmt: skip
    assert list(answer) == ["H100-SXM", "B200"]
    for hw in answer.values():
        for key in ("min_devices_memory", "min_devices_throughput", "min_devices_slo"):
            assert isinstance(hw[key], int) and hw[key] >= 1
        assert hw["recommended_placement"] == "contiguous"
        assert hw["cost_per_million_tokens"] > 0
    assert answer["H100-SXM"]["min_devices_memory"] == 4
    assert answer["B200"]["min_devices_memory"] == 1  # 180 GB holds all of it at bf16
    for hw in answer.values():  # dropless without a drop budget
        assert hw["dropless"] is True and hw["recommended_capacity_factor"] is None
        assert hw["drop_rate"] == 0.0 and hw["padding_factor"] >= 1.0
    assert json.loads((out / "plan.json").read_text()) == answer
    html = (out / "report.html").read_text()
    assert "min devices (memory)" in html and html.count("<svg") >= 6


@pytest.mark.slow
def test_cli_json_answers_deepseek_v3_on_h100_and_b200(tmp_path):
    answer, _ = _plan_cli(tmp_path, "DeepSeek-V3", "--tokens-per-s", "100000")
    assert answer["H100-SXM"]["min_devices_memory"] == 64
    assert answer["B200"]["min_devices_memory"] == 16
    for hw in answer.values():
        assert hw["min_devices_throughput"] >= hw["min_devices_memory"]
        assert hw["tokens_per_s"] >= 100000


def test_bad_input_is_one_line(tmp_path):
    base = ("plan-capacity", "--model", "Mixtral-8x7B", "--tokens-per-s", "1", "--out")
    assert_one_line_error(
        run_moesim(*base, str(tmp_path), "--hardware", "H999"), "hardware", "H999"
    )
    assert_one_line_error(
        run_moesim(
            *base, str(tmp_path), "--hardware", "H100-SXM", "B200",
            "--price-per-device-hour", "1", "2", "3",
        ),
        "price-per-device-hour",
    )  # fmt: skip
    assert_one_line_error(
        run_moesim(*base, str(tmp_path), "--hardware", "B200", "--precision", "fp4"),
        "precision",
        "fp4",
    )
    for option, value in (("--nodes", "0"), ("--redundant", "-1"), ("--max-drop-rate", "1")):
        assert_one_line_error(
            run_moesim(*base, str(tmp_path), "--hardware", "B200", option, value),
            option.strip("-"),
            value,
        )
    # 8 experts + 3 redundant slots do not divide among one node of 8
    assert_one_line_error(
        run_moesim(*base, str(tmp_path), "--hardware", "H100-SXM", "--nodes", "1",
                   "--redundant", "3"),
        "field 'redundant'", "value 3", "8 H100-SXM devices",
    )  # fmt: skip
    assert_one_line_error(
        run_moesim("plan-capacity", "--model", "Mixtral-8x7B", "--hardware", "B200", "--out",
                   str(tmp_path)),
        "tokens-per-s", "--nodes",
    )  # fmt: skip


def test_cli_fixed_nodes_prints_the_drop_rate_beside_tokens_per_s(tmp_path):
    proc = run_moesim(
        "plan-capacity", "--model", "Mixtral-8x7B", "--hardware", "H100-SXM", "--nodes", "1",
        "--redundant", "8", "--synthetic", "zipf:1.2", "--out", str(tmp_path / "p"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())["H100-SXM"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("H100-SXM:"))
    assert line.startswith("H100-SXM: 8 devices (1 nodes) fit; dropless, ")
    assert f"{plan['tokens_per_s']:,.0f} tokens/s at 0.000% dropped" in line
    assert f"would need capacity factor {plan['padding_factor']:.3f}" in line
    md = (tmp_path / "p" / "summary.md").read_text()
    assert "| tokens/s (dropped) |" in md and f"{plan['tokens_per_s']:,.0f} (0.000%)" in md
    padded = f"would need capacity factor {plan['padding_factor']:.3f} to drop nothing"
    assert padded in md


def test_plan_outputs_are_byte_identical(tmp_path):
    from moesim.plan.report import write_plan

    req = PlanRequest(model="Mixtral-8x7B", hardware=("B200",), tokens_per_s=20_000)
    for name in ("a", "b"):
        write_plan(plan_capacity(req), req, tmp_path / name)
    for name in ("plan.json", "evaluations.parquet", "report.html", "summary.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_search_stops_doubling_when_more_devices_do_no_better():
    from moesim.plan.capacity import _search

    sizes = [1, 2, 4, 8, 16, 32]
    tried: list[int] = []

    def never(d: int) -> bool:
        tried.append(d)
        return False

    figure = {1: 1.0, 2: 2.0, 4: 3.0, 8: 3.0, 16: 9.0, 32: 9.0}.__getitem__
    # 1 -> 2 -> 4 improve; 8 does no better than 4 (3.0 <= 3.0): stop at 4, never try 16
    assert _search(sizes, 0, never, figure) == (None, 4)
    assert tried == [1, 2, 4, 8]
    # without a figure the doubling runs to the largest size
    tried.clear()
    assert _search(sizes, 0, never) == (None, None)
    assert tried == [1, 2, 4, 8, 16, 32]
    # a figure that keeps growing: doubling to 16 meets d >= 10, nothing lies between 8 and 16
    assert _search(sizes, 0, lambda d: d >= 10, float) == (16, None)


def test_an_unreached_target_names_the_largest_size_tried(tmp_path):
    # 8 experts + 8 redundant slots = 16 slots: 16 devices is the largest count they divide
    out = run_moesim(
        "plan-capacity", "--model", "Mixtral-8x7B", "--hardware", "H200", "--tokens-per-s",
        "1e9", "--redundant", "8", "--out", str(tmp_path / "p"), "--json",
    )  # fmt: skip
    notes = json.loads(out.stdout)["H200"]["notes"]
    assert notes == [
        "throughput not reached on up to 16 devices (the largest count that divides the 8 "
        "experts and 8 redundant slots)"
    ]


def test_int4_memory_is_judged_at_int4_though_timed_as_fp8(tmp_path):
    """DeepSeek-V3 on one node of 8 H100s: at int4 its 32 expert slots a device fit (fp8
    does not), so the node is recommended, with the memory at int4."""
    from moesim.costs.memory import memory_per_device
    from moesim.hardware import get_profile
    from moesim.model.shapes import get_preset

    out = run_moesim(
        "plan-capacity", "--model", "DeepSeek-V3", "--hardware", "H100-SXM", "--nodes", "1",
        "--precision", "int4", "--out", str(tmp_path / "p"), "--json",
    )  # fmt: skip
    a = json.loads(out.stdout)["H100-SXM"]
    want = memory_per_device(
        get_preset("DeepSeek-V3"), num_devices=8, mode="decode", tokens_per_device=64,
        sequence_length=4096, precision="int4", capacity_factor=None,
        hbm_bytes=get_profile("H100-SXM").memory.hbm_bytes, expert_slots=32,
    )  # fmt: skip
    assert want.fits
    assert (a["recommended_devices"], a["memory_fits"]) == (8, True)
    assert a["memory_per_device_bytes"] == want.total_bytes
