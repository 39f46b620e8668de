"""Capacity planner: memory answer by hand, minimal device counts, CLI answers."""

from __future__ import annotations

import json

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


def test_mixtral_on_h100_memory_answer_matches_hand_computation():
    req = PlanRequest(model="Mixtral-8x7B", hardware=("H100-SXM",), tokens_per_s=30_000)
    (plan,) = plan_capacity(req)
    # by hand, bf16, 64 decode sequences of 4,096 tokens: weights + KV cache alone
    kv = 64 * 4096 * KV_PER_TOKEN
    two = 2 * DENSE + 2 * 32 * 4 * EXPERT + kv  # 2 devices: 4 experts per MoE layer each
    four = 2 * DENSE + 2 * 32 * 2 * EXPERT + kv  # 4 devices: 2 experts each
    act = 64 * (15 * 4096 + 4 * 8 + 2.0 * 2 * 2 * (2 * 4096 + 3 * 14336))  # capacity 2.0
    assert two > HBM_H100 and four + act < HBM_H100
    assert plan.min_devices_memory == 4
    # throughput answer: met there, not at the next smaller size the search can pick
    d = plan.min_devices_throughput
    assert d is not None and plan.evaluations[d].tokens_per_s >= 30_000
    sizes = cluster_sizes(8, 8, 4096)
    smaller = sizes[sizes.index(d) - 1]
    assert smaller >= 4 and plan.evaluations[smaller].tokens_per_s < 30_000
    rec = plan.recommended
    assert rec is not None and rec.drop_rate <= 0.001
    assert rec.placement == "contiguous"
    assert plan.min_devices_slo is None  # no latency target given


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
