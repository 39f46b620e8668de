"""Benchmarks run as tests only on request: pytest -m benchmark."""

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, load_benchmark


def _run_json(script: str, *args: str) -> Any:
    """Run ``benchmarks/<script> --json ARGS`` with this checkout's moesim; its JSON."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--json", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.benchmark
def test_demo_speed_benchmark_prints_figures():
    figures = _run_json("demo_speed.py", "--repeats", "1")
    assert figures["demo_wall_s_median"] < figures["target_s"]


def test_placement_eval_quick_runs_and_checks_targets():
    out = _run_json("placement_eval.py", "--quick", "--score-layers", "2", "--seeds", "1,2")
    planners = {r["planner"] for r in out["rows"]}
    assert {
        "contiguous-no-redundant",
        "eplb-global",
        "eplb-hierarchical",
        "balanced-global",
        "balanced-hierarchical",
        "affinity",
        "oracle",
        "affinity-law",
        "affinity-fit",
    } <= planners
    # the synthetic data is drawn per seed, the others once; the law plan only where a
    # generator's law exists
    assert {r["seed"] for r in out["rows"] if r["dataset"].startswith("dsv3")} == {1, 2}
    assert {r["seed"] for r in out["rows"] if not r["dataset"].startswith("dsv3")} == {None}
    assert all(
        r["dataset"].startswith("dsv3")
        for r in out["rows"]
        if r["planner"] in ("affinity-law", "affinity-fit")
    )
    drift = [c for c in out["targets"]["cases"] if "drift_gap_closed" in c]
    assert drift and all(
        len(c["drift_gap_closed_per_seed"]) == 2
        and {"law_plan_gap_closed", "fit_plan_gap_closed"} <= set(c)
        for c in drift
    )
    assert {r["dataset"] for r in out["rows"]} >= {"flame-290m", "dsv3-zipf1.0"}
    assert all(r["balance_mean"] >= 1.0 for r in out["rows"])
    assert out["targets"]["cases"] and {
        "balance_le_global",
        "remote_le_hierarchical",
        "balance_lt_contiguous",
        "remote_le_contiguous",
    } <= set(out["targets"]["cases"][0])
    base = [r for r in out["rows"] if r["planner"] == "contiguous-no-redundant"]
    assert base and all(r["redundant"] == 0 for r in base if r["dataset"] != "mistral-c4")
    assert {r["mode"] for r in out["replan"]} == {"static", "full", "limit-20%"}
    assert len(out["targets"]["replan"]) == 6  # 3 planners x 2 replica choices
    assert set(out["targets"]["met"]) == {"affinity", "affinity-last-window"}


@pytest.mark.benchmark
def test_plan_capacity_benchmark_prints_figures():
    figures = _run_json("plan_capacity.py", "--models", "Mixtral-8x7B")
    mixtral = figures["models"]["Mixtral-8x7B"]
    assert mixtral["wall_s"] < figures["target_s"]
    assert set(mixtral["answers"]) == {"H100-SXM", "B200"}


@pytest.mark.benchmark
def test_trace_store_prints_every_stages_peak_rss():
    """A small trace over DeepSeek-V3's 58 MoE layers: write, read, stats and simulate each
    print a peak RSS; simulate replays every token (8 devices x 14 tokens >= 107)."""
    f = _run_json("trace_store.py", "--assignments", "5e4")
    assert (f["layers"], f["tokens_per_layer"], f["assignments"]) == (58, 107, 107 * 8 * 58)
    for stage in ("write", "read", "stats", "simulate"):
        assert 0 < f[f"{stage}_peak_rss_mb"] < f["target_peak_rss_mb"]
    assert f["simulate_assignments"] == 8 * 14 * 8 * 58


def test_trace_stats_benchmark_prints_each_part_against_the_bare_bincount():
    """2 x 10^5 assignments: 25,000 // (8 x 8) = 3,125 tokens a layer; each part's ratio is
    its rate over the bare bincount's, and the verdicts follow the two targets."""
    f = _run_json("trace_stats.py", "--assignments", "2e5", "--repeats", "1")
    assert f["assignments"] == 3_125 * 8 * 8
    bare = f["bare_bincount_rate_m_per_s"]
    for part in ("stats", "decode_only", "counting_only"):
        over = "stats_over_bare" if part == "stats" else f"{part.split('_')[0]}_over_bare"
        assert f[over] == pytest.approx(f[f"{part}_rate_m_per_s"] / bare, abs=2e-3)
    assert f["rate_pass"] == (f["stats_rate_m_per_s"] >= 20.0)
    assert f["ratio_pass"] == (f["stats_over_bare"] >= 0.3)


def test_engine_scale_prints_its_figures():
    """The scale benchmark runs (at sizes the default suite can afford) and prints the
    figures it promises for every size."""
    rows = _run_json("engine_scale.py", "--devices", "16", "32")
    assert [r["devices"] for r in rows] == [16, 32]
    for r in rows:
        assert {"wall_s", "events", "events_per_s", "peak_rss_mb"} <= set(r)
        assert r["events"] > 0 and r["step_time_us"] > 0


def test_engine_scale_one_exchange_counts_the_flow_tiers_work():
    """--one-exchange: a dense skewed dispatch on 16 devices is 16 x 15 flows, re-rated at
    least once, and the step projection is its time times the step's 2 x 58 exchanges."""
    r = _run_json("engine_scale.py", "--devices", "16", "--one-exchange")
    assert r["exchange_flows"] == 16 * 15 and r["exchange_recomputations"] >= 1
    assert r["flow_exchanges_per_step"] == 2 * 58
    # both figures are rounded (wall to 1 ms, projection to 0.1 s): 116 x 0.5 ms + 0.05 s
    assert r["step_projection_s"] == pytest.approx(r["exchange_wall_s"] * 116, abs=0.11)


def test_trace_step_times_every_stage():
    """The trace-replay step benchmark, at a size the default suite can afford (one node,
    64 tokens per device): a trace is written and replayed, and the stages it names add
    up to less than the wall time (start-up is what is left)."""
    r = _run_json("trace_step.py", "--nodes", "1", "--tokens-per-device", "64")
    assert (r["devices"], r["tokens_per_device"]) == (8, 64)
    assert r["trace_synth_s"] > 0 and r["step_time_us"] > 0 and r["peak_rss_mb"] > 0
    stages = ["trace_read_s", "prepare_rest_s", "routing_s", "program_s", "engine_s"]
    assert all(r[k] >= 0 for k in stages) and r["routing_s"] > 0
    assert r["startup_s"] > 0
    assert sum(r[k] for k in [*stages, "outputs_s", "startup_s"]) == pytest.approx(
        r["wall_s"], abs=0.05
    )


def test_best_weighting_recovers_a_linear_forecast_and_fits_per_layer():
    """The bound row's weighting: where the target is exactly a linear combination of the
    two windows (layer 0: the trend ``2 last - previous``; layer 1: the mean of the two plus
    3), it is found; a target no weighting reaches gets the least-squares one, clipped."""
    pe = load_benchmark("placement_eval")
    prev = np.array([[10.0, 20.0, 30.0, 40.0], [5.0, 1.0, 4.0, 2.0]])
    last = np.array([[12.0, 18.0, 33.0, 37.0], [3.0, 3.0, 2.0, 8.0]])
    target = np.stack([2 * last[0] - prev[0], (last[1] + prev[1]) / 2 + 3])
    np.testing.assert_allclose(pe.best_weighting(prev, last, target), target, atol=1e-9)
    # one layer, two experts equal in both windows but not in the target: their mean
    got = pe.best_weighting(np.array([[1.0, 1.0, 2.0]]), np.array([[1.0, 1.0, 3.0]]),
                            np.array([[0.0, 4.0, 5.0]]))  # fmt: skip
    np.testing.assert_allclose(got, [[2.0, 2.0, 5.0]], atol=1e-9)


def test_placement_eval_datasets_follow_window_tokens_zipfs_and_only_synthetic():
    """``--window-tokens``, ``--zipfs`` and ``--only-synthetic`` reach the datasets: three
    windows of the asked length per (Zipf, static or drifting, seed), nothing else."""
    pe = load_benchmark("placement_eval")
    sets = pe.datasets(False, 2, [1], window_tokens=2048, zipfs=[0.3], real=False)
    assert [ds.name for ds in sets] == ["dsv3-zipf0.3", "dsv3-drift0.3"]
    for ds in sets:
        assert ds.seed == 1 and ds.history is not None and ds.law is not None
        assert ds.history.shape == ds.plan_ids.shape == ds.score_ids.shape == (2, 2048, 8)
        assert ds.law.shape == (2, 256)
    assert {ds.name for ds in pe.datasets(True, 2, [1], 2048, [0.3])} >= {"flame-290m"}


def test_sweep_speed_runs_the_twenty_cases():
    """The cases are the issue's twenty: 2 hardware x 2 modes x 5 contexts, all simulated."""
    figures = _run_json("sweep_speed.py", "--repeats", "1")
    assert figures["cases"] == 2 * 2 * 5
    names = list(figures["per_case_s"])
    assert names[0] == "mixtral-H100-SXM-prefill-512" and names[-1] == "mixtral-H200-decode-8192"
