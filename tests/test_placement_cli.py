"""Placement files, the ``moesim place`` command, placements in scenarios, re-planning and
simulator-in-the-loop refinement."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.placement import STRATEGIES, Placement, plan
from moesim.placement.io import read_placement, write_placement
from moesim.placement.metrics import moved_share, planned_balance
from moesim.placement.replan import align_devices, forecast_loads, incremental, replay
from moesim.scenario import Scenario
from moesim.sim.prepare import prepare
from moesim.sim.refine import refine, step_time_fn
from moesim.sim.simulate import simulate
from moesim.traces.store import RoutingTrace, write_trace
from tests.conftest import FLAME_TRACE, REPO, assert_one_line_error
from tests.conftest import run_moesim as moesim

SHARED = REPO.parent / "shared" / "data"
COUNTS = SHARED / "olmoe_mixtral_expert_counts_L0_7_15.json"


# ----- placement files -------------------------------------------------------------------------


def test_placement_file_round_trip(tmp_path):
    p = Placement(np.array([[[0, 1, 2], [3, 0, 1]], [[1, 2, 3], [0, 1, 2]]], np.int32), 4)
    path = write_placement(tmp_path / "p.yaml", p, [2, 3], nodes=1, devices_per_node=2)
    q, names = read_placement(path, num_experts=4, num_layers=2, num_devices=2)
    assert names == [2, 3]
    np.testing.assert_array_equal(q.slots, p.slots)


def test_placement_file_by_device_id(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("num_experts: 2\nlayers:\n  - devices: {1: [1], 0: [0]}\n")
    p, _ = read_placement(path, num_devices=2)
    assert p.slots.tolist() == [[[0], [1]]]


BAD_FILES = {
    "homeless": ("num_experts: 3\nlayers:\n  - devices: [[0], [1]]\n", "no home", "2"),
    "unequal": ("num_experts: 3\nlayers:\n  - devices: [[0, 1], [2]]\n", "unequal slot", "1"),
    "expert": ("num_experts: 2\nlayers:\n  - devices: [[0], [5]]\n", "expert out of range", "5"),
    "device": (
        "num_experts: 2\nlayers:\n  - devices: {0: [0], 7: [1]}\n",
        "device out of range",
        "7",
    ),
    "memory": (
        "num_experts: 2\nlayers:\n  - devices: [[0, 1, 0, 1], [1, 0, 1, 0]]\n",
        "memory",
        "4",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_placement_file(tmp_path, case):
    text, needle, value = BAD_FILES[case]
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=needle) as err:
        read_placement(path, num_devices=2, max_slots_per_device=3)
    assert f"value {value}" in str(err.value)


TINY = {
    "name": "tiny",
    "num_layers": 2,
    "d_model": 256,
    "expert_d_ff": 512,
    "num_experts": 4,
    "top_k": 2,
    "attention": {"num_heads": 4},
    "vocab_size": 1000,
    "source": "test",
}


def _tiny_trace(path, seed=0) -> None:
    rng = np.random.default_rng(seed)
    p = np.array([0.55, 0.25, 0.12, 0.08])
    ids = np.stack(
        [np.stack([rng.choice(4, 2, replace=False, p=p) for _ in range(64)]) for _ in range(2)]
    )
    write_trace(
        RoutingTrace(
            expert_ids=ids.astype(np.int32),
            gate_weights=np.full(ids.shape, 0.5, np.float32),
            steps=np.zeros(64, np.int32),
            layers=(0, 1),
            num_experts=4,
        ),
        path,
    )


def _tiny_scenario(tmp_path, **kw) -> dict:
    _tiny_trace(tmp_path / "tr")
    return {
        "name": "t",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 2, "devices_per_node": 2},
        "model": TINY,
        "routing": {"trace": str(tmp_path / "tr")},
        "mode": "prefill",
        "tokens_per_device": 16,
    } | kw


SCENARIO_BAD = {
    "homeless": ("[[0], [1], [2], [0]]", "no home"),
    "unequal": ("[[0, 1], [2], [3], [0]]", "unequal slot"),
    "expert": ("[[0], [1], [2], [9]]", "expert out of range"),
    "device": ("{0: [0], 1: [1], 2: [2], 7: [3]}", "device out of range"),
    "memory": (str([[0, 1, 2, 3] * 3] * 4), "memory"),
}


@pytest.mark.parametrize("case", sorted(SCENARIO_BAD))
def test_simulate_rejects_bad_placement_file_in_one_line(tmp_path, case, write_scenario):
    devices, needle = SCENARIO_BAD[case]
    text = "num_experts: 4\nlayers:\n" + f"  - devices: {devices}\n" * 2
    (tmp_path / "p.yaml").write_text(text)
    data = _tiny_scenario(tmp_path, placement="p.yaml")
    if case == "memory":  # 3 GB experts: about 9 slots per layer fit an 80 GB device
        data["model"] = TINY | {"d_model": 8192, "expert_d_ff": 65536}
    path = write_scenario(data)
    proc = moesim("simulate", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "p.yaml", needle)
    assert not (tmp_path / "out").exists()


def test_placement_file_node_layout_and_redundancy_must_match_the_cluster(tmp_path):
    """A plan for 1 node x 4 devices is not one for 2 x 2 (replicas on distinct nodes,
    traffic within nodes); a scenario that states redundant slots must agree with its file."""
    p = Placement(np.array([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2, np.int32), 4)
    write_placement(tmp_path / "p.yaml", p, nodes=1, devices_per_node=4)
    with pytest.raises(InputError, match="2 devices per node") as err:
        read_placement(tmp_path / "p.yaml", num_devices=4, devices_per_node=2)
    assert (err.value.field, err.value.value) == ("devices_per_node", 4)
    write_placement(tmp_path / "p.yaml", p, nodes=2, devices_per_node=2)
    ok = Scenario.model_validate(_tiny_scenario(tmp_path, placement="p.yaml", redundant_slots=4))
    assert prepare(ok, tmp_path).placement.slots.shape == (2, 4, 2)
    # a sweep case is the scenario dumped and validated again: redundant_slots 0 is then
    # "set", and still means "the file's"
    plain = Scenario.model_validate(_tiny_scenario(tmp_path, placement="p.yaml"))
    again = Scenario.model_validate(plain.model_dump())
    assert prepare(again, tmp_path).placement.slots.shape == (2, 4, 2)
    bad = Scenario.model_validate(_tiny_scenario(tmp_path, placement="p.yaml", redundant_slots=8))
    with pytest.raises(InputError, match="has 4 redundant slots") as err:
        prepare(bad, tmp_path, source="s.yaml")
    assert (err.value.file, err.value.field, err.value.value) == ("s.yaml", "redundant_slots", 8)


# ----- scenarios with planners and replica choice --------------------------------------------


def test_default_scenario_placement_is_unchanged(tmp_path):
    sc = Scenario.model_validate(_tiny_scenario(tmp_path))
    assert prepare(sc, tmp_path).placement.slots[0].tolist() == [[0], [1], [2], [3]]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_simulator_accepts_every_planner(tmp_path, strategy):
    base = _tiny_scenario(tmp_path, redundant_slots=4, replica_choice="batch-split")
    contig = simulate(Scenario.model_validate(base | {"redundant_slots": 0}), tmp_path)
    planned = simulate(Scenario.model_validate(base | {"placement": strategy}), tmp_path)
    b0 = max(contig.runs[0].summary["routed_balance"])
    b1 = max(planned.runs[0].summary["routed_balance"])
    assert planned.runs[0].summary["step_time_us"] > 0
    if strategy not in ("contiguous", "round-robin"):
        assert b1 < b0  # load-aware planners beat one expert per device on this skew


def test_scenario_reads_placement_file(tmp_path):
    p = Placement(np.array([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2, np.int32), 4)
    write_placement(tmp_path / "p.yaml", p)
    sc = Scenario.model_validate(_tiny_scenario(tmp_path, placement="p.yaml"))
    np.testing.assert_array_equal(prepare(sc, tmp_path).placement.slots, p.slots)


def test_scenario_rejects_unknown_placement(tmp_path):
    with pytest.raises(ValueError, match="affinity"):
        Scenario.model_validate(_tiny_scenario(tmp_path, placement="magic"))


# ----- moesim place ----------------------------------------------------------------------------


def test_place_json_from_trace_window(tmp_path):
    out = tmp_path / "p.yaml"
    proc = moesim(
        "place", "--trace", str(FLAME_TRACE), "--window", "0:1024", "--nodes", "2",
        "--gpus-per-node", "8", "--redundant", "16", "--strategy", "affinity",
        "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [x["layer"] for x in data["layers"]] == list(range(2, 10))
    assert all(len(x["devices"]) == 16 and len(x["devices"][0]) == 5 for x in data["layers"])
    m = data["metrics"]
    assert m["slots_per_device"] == 5 and m["planned_balance_mean"] < 1.1
    p, _ = read_placement(out, num_devices=16)
    assert p.slots.tolist() == [x["devices"] for x in data["layers"]]


def test_place_from_npy_and_csv(tmp_path):
    loads = np.array([[12.0, 4.0, 2.0, 2.0]])
    np.save(tmp_path / "l.npy", loads)
    np.savetxt(tmp_path / "l.csv", loads, delimiter=",")
    for f in ("l.npy", "l.csv"):
        proc = moesim(
            "place", "--loads", str(tmp_path / f), "--nodes", "2", "--gpus-per-node", "2",
            "--redundant", "4", "--strategy", "eplb-global", "--out", str(tmp_path / "p.yaml"),
            "--json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["layers"][0]["devices"] == [[0, 1], [0, 2], [0, 3], [0, 1]]  # as test_placement
        assert data["metrics"]["planned_balance_max"] == 1.0


@pytest.mark.skipif(not COUNTS.is_file(), reason="needs ../shared/data")
def test_place_from_counts_json(tmp_path):
    proc = moesim(
        "place", "--loads", str(COUNTS), "--counts-model", "olmoe", "--domain", "c4",
        "--nodes", "4", "--gpus-per-node", "8", "--redundant", "32", "--strategy", "greedy",
        "--out", str(tmp_path / "p.yaml"), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["layers"]) == 3 and data["metrics"]["slots_per_device"] == 3
    assert [entry["layer"] for entry in data["layers"]] == [0, 7, 15]  # the model's layers


@pytest.mark.skipif(not COUNTS.is_file(), reason="needs ../shared/data")
def test_load_loads_counts_json_names_layers_and_valid_models():
    from moesim.placement.commands import load_loads

    w, layers = load_loads(COUNTS, model="olmoe", domain="c4")
    assert w.shape == (3, 64) and layers == [0, 7, 15]
    with pytest.raises(InputError, match="valid: mistral, olmoe") as err:
        load_loads(COUNTS, model="deepseek")
    assert err.value.field == "model" and err.value.value == "deepseek"


def test_load_loads_rejects_what_is_not_a_load_and_names_the_entry(tmp_path):
    from moesim.placement.commands import load_loads

    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    np.save(tmp_path / "c.npy", np.array([[1 + 2j, 3.0]]))
    for name in ("s.npy", "c.npy"):
        with pytest.raises(InputError, match="integer or float array"):
            load_loads(tmp_path / name)
    bad = np.ones((2, 4))
    bad[1, 2] = -3.0
    np.save(tmp_path / "neg.npy", bad)
    with pytest.raises(InputError, match="finite and >= 0") as err:
        load_loads(tmp_path / "neg.npy")
    assert (err.value.field, err.value.value) == ("layer 1, expert 2", -3.0)
    (tmp_path / "empty.csv").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning printed before the error line
        with pytest.raises(InputError, match="layers x experts"):
            load_loads(tmp_path / "empty.csv")
    (tmp_path / "flat.json").write_text('{"m": {"expert_counts": [1, 2]}}')  # no domain level
    with pytest.raises(InputError, match="domain") as err:
        load_loads(tmp_path / "flat.json")
    assert err.value.field == "m.expert_counts"
    np.save(tmp_path / "ok.npy", np.array([[1, 2]]))  # integers are loads too
    w, layers = load_loads(tmp_path / "ok.npy")
    assert w.tolist() == [[1.0, 2.0]] and layers is None


def test_place_out_folder_and_counts_options_with_trace_are_one_line(tmp_path):
    base = ["place", "--trace", str(FLAME_TRACE), "--nodes", "2", "--gpus-per-node", "8"]
    proc = moesim(*base, "--out", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path), "folder")
    proc = moesim(*base, "--counts-model", "olmoe", "--out", str(tmp_path / "p.yaml"))
    assert_one_line_error(proc, "--counts-model")
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--window", "5:2"], ["window", "5:2"]),
        (["--strategy", "magic"], ["strategy", "magic"]),
        (["--redundant", "3"], ["redundant", "multiple"]),
        (["--strategy", "eplb-hierarchical", "--groups", "3"], ["groups", "3", "divide"]),
        (["--groups", "4"], ["groups", "4", "eplb-global"]),
    ],
)
def test_place_bad_input_is_one_line(tmp_path, args, needles):
    base = ["place", "--trace", str(FLAME_TRACE), "--nodes", "2", "--gpus-per-node", "8"]
    proc = moesim(*base, *args, "--out", str(tmp_path / "p.yaml"))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "p.yaml").exists()


def test_place_eplb_hierarchical_with_groups_reproduces_eplb(tmp_path):
    """The first half of the FLAME trace at 4 x 8 + 32 with 4 groups: the placement file
    holds DeepSeek EPLB's own plan (its reference outputs), slot for slot."""
    ref_path = SHARED / "eplb_reference_outputs.json"
    if not ref_path.exists():
        pytest.skip(f"EPLB reference outputs absent: {ref_path}")
    case = next(
        c
        for c in json.loads(ref_path.read_text())["cases"]
        if c["name"].startswith("flame") and c["policy"] == "hierarchical"
    )
    out = tmp_path / "p.yaml"
    proc = moesim(
        "place", "--trace", str(FLAME_TRACE), "--window", "0:1024", "--no-forecast",
        "--nodes", "4", "--gpus-per-node", "8", "--redundant", "32",
        "--strategy", "eplb-hierarchical", "--groups", str(case["num_groups"]),
        "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metrics"]["groups"] == 4
    p, _ = read_placement(out, num_experts=64, num_layers=8, num_devices=32)
    assert p.slots.reshape(8, -1).tolist() == case["phy2log"]


def test_place_incremental_from_previous(tmp_path):
    base = ["place", "--trace", str(FLAME_TRACE), "--nodes", "2", "--gpus-per-node", "8"]
    base += ["--redundant", "16", "--strategy", "eplb-global"]
    assert moesim(*base, "--window", "0:1024", "--out", str(tmp_path / "a.yaml")).returncode == 0
    proc = moesim(
        *base, "--window", "1024:2048", "--previous", str(tmp_path / "a.yaml"),
        "--max-moved-share", "0.1", "--out", str(tmp_path / "b.yaml"), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metrics"]["moved_share"] <= 0.1
    full = moesim(
        *base, "--window", "1024:2048", "--previous", str(tmp_path / "a.yaml"),
        "--out", str(tmp_path / "c.yaml"), "--json",
    )  # fmt: skip
    assert json.loads(full.stdout)["metrics"]["moved_share"] > 0.5


# ----- re-planning and refinement ---------------------------------------------------------------


def test_forecast_loads_averages_noise_shrinks_it_and_extrapolates_trends():
    # no trend and no skew beyond counting noise: the windows are averaged (a = 1/2) and
    # the differences between experts, all within noise, shrunk to the layer's mean
    prev = np.array([[100.0, 104.0, 98.0, 102.0]])
    last = np.array([[102.0, 100.0, 101.0, 99.0]])
    assert forecast_loads(prev, last) == pytest.approx(np.full((1, 4), 100.75))
    # skew far above noise, no trend: averaged, and barely shrunk. Estimates 401, 99,
    # 100.5, 399.5 (mean 250); noise a^2 last + (1 - a)^2 prev + 0.5 = 201, 50, 50.75,
    # 200.25 (mean 125.5); spread 22575.625 - 125.5 = 22450.125; 401 -> 250 + 151 x
    # 22450.125 / (22450.125 + 201) = 399.66
    prev = np.array([[400.0, 100.0, 100.0, 400.0]])
    last = np.array([[402.0, 98.0, 101.0, 399.0]])
    got = forecast_loads(prev, last)
    assert got[0, 0] == pytest.approx(399.66, abs=0.01) and got[0, 1] == pytest.approx(
        99.34, abs=0.01
    )
    # a trend far above noise: nearly linear extrapolation. V = 100 + 0.5 = 100.5,
    # mean squared change 100^2 = 10000, D = 10000 - 201 = 9799,
    # a = (2 D + V) / (D + 2 V) = 19698.5 / 10000 = 1.96985: estimates 246.985 and
    # -46.985 (mean 100), noise 629.58 and 335.61, spread 21604.6 - 482.6 = 21122.0,
    # 246.985 -> 100 + 146.985 x 21122.0 / 21751.6 = 242.73; falling loads stop at zero
    prev = np.array([[50.0, 150.0, 50.0, 150.0]])
    last = np.array([[150.0, 50.0, 150.0, 50.0]])
    assert forecast_loads(prev, last) == pytest.approx(np.array([[242.73, 0, 242.73, 0]]), abs=0.01)
    # each layer has its own weight and shrinkage; never negative
    two = forecast_loads(np.vstack([prev, prev * 0 + 100]), np.vstack([last, last * 0 + 100]))
    assert two[1] == pytest.approx(100.0)
    assert two[0] == pytest.approx(np.array([242.73, 0, 242.73, 0]), abs=0.01)
    assert (forecast_loads(np.array([[500.0, 0.0]]), np.array([[10.0, 0.0]])) >= 0).all()


def test_align_devices_renumbers_to_match():
    old = Placement(np.array([[[0, 1], [2, 3]]], np.int32), 4)
    new = Placement(np.array([[[3, 2], [1, 0]]], np.int32), 4)
    assert moved_share(old, new) == 1.0
    assert moved_share(old, align_devices(old, new, 2)) == 0.0


def test_incremental_respects_move_budget_and_improves_balance():
    rng = np.random.default_rng(0)
    w0 = rng.zipf(1.3, size=(4, 32)).astype(float)
    w1 = np.roll(w0, 5, axis=1)
    old = plan(w0, "eplb-global", nodes=2, devices_per_node=4, redundant=8)
    new = incremental(old, w1, max_moved_share=0.25)
    assert moved_share(old, new) <= 0.25
    assert planned_balance(new, w1).mean() < planned_balance(old, w1).mean()
    for li in range(4):
        new.replicas(li)  # every expert still homed


def test_replay_scores_each_window_on_the_next():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, 16, size=(4 * 64, 2)) for _ in range(2)])  # (2, 256, 2)

    def planner(loads, _ids):
        return plan(loads, "eplb-global", nodes=2, devices_per_node=2, redundant=4)

    res = replay(ids, 64, planner, devices_per_node=2, tokens_per_batch=32, expert_bytes=10.0)
    assert [r.window for r in res] == [1, 2, 3]
    assert res[0].moved_share == 0 and all(r.migration_bytes >= 0 for r in res)
    static = replay(ids, 64, planner, devices_per_node=2, tokens_per_batch=32, static=True)
    assert all(r.moved_share == 0 for r in static)


def test_refine_lowers_simulated_step_time(tmp_path):
    sc = Scenario.model_validate(
        _tiny_scenario(tmp_path, redundant_slots=4, replica_choice="batch-split")
    )
    prep = prepare(sc, tmp_path)
    evaluate = step_time_fn(prep, "prefill")
    start = evaluate(prep.placement)
    best, val, kept = refine(prep.placement, evaluate, iterations=40, seed=0)
    assert val <= start
    assert kept == 0 or val < start
    for li in range(best.num_layers):
        best.replicas(li)
    # contiguous [0 1] [2 3] [0 1] [2 3] loads devices 0 and 2 most: a swap helps
    assert kept > 0 and val < start


def test_place_refines_on_a_scenario(tmp_path, write_scenario):
    data = _tiny_scenario(tmp_path, replica_choice="batch-split")
    scenario = write_scenario(data)
    base = ["place", "--trace", str(tmp_path / "tr"), "--nodes", "2", "--gpus-per-node", "2"]
    base += ["--redundant", "4", "--strategy", "contiguous", "--json"]
    plain = moesim(*base, "--out", str(tmp_path / "a.yaml"))
    proc = moesim(
        *base, "--refine-scenario", str(scenario), "--refine-steps", "40",
        "--out", str(tmp_path / "b.yaml"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["metrics"]
    assert m["refine_mode"] == "prefill"
    # contiguous [0 1] [2 3] [0 1] [2 3] loads the devices of the hot expert 0 most: swaps help
    assert m["refine_swaps_kept"] > 0
    assert m["step_time_us_after"] < m["step_time_us_before"]
    refined, _ = read_placement(tmp_path / "b.yaml", num_experts=4, num_layers=2, num_devices=4)
    unrefined, _ = read_placement(tmp_path / "a.yaml", num_experts=4, num_layers=2, num_devices=4)
    assert json.loads(plain.stdout)["layers"] != json.loads(proc.stdout)["layers"]
    # the written plan is the refined one, and the simulator gives it the printed step time
    sc = Scenario.model_validate(data | {"placement": str(tmp_path / "b.yaml")})
    assert simulate(sc, tmp_path).runs[0].summary["step_time_us"] == pytest.approx(
        m["step_time_us_after"], abs=1e-3
    )
    assert moved_share(unrefined, refined) > 0


def test_place_refine_rejects_a_mismatched_scenario(tmp_path, write_scenario):
    scenario = write_scenario(_tiny_scenario(tmp_path))  # 4 devices
    proc = moesim(
        "place", "--trace", str(tmp_path / "tr"), "--nodes", "2", "--gpus-per-node", "4",
        "--redundant", "4", "--refine-scenario", str(scenario), "--out", str(tmp_path / "p.yaml"),
    )  # fmt: skip
    assert_one_line_error(proc, "scenario.yaml", "devices")
    assert not (tmp_path / "p.yaml").exists()


def test_place_forecasts_from_the_preceding_window(tmp_path):
    base = ["place", "--trace", str(FLAME_TRACE), "--nodes", "2", "--gpus-per-node", "8"]
    base += ["--redundant", "16", "--strategy", "eplb-global", "--json"]
    first = moesim(*base, "--window", "0:1024", "--out", str(tmp_path / "a.yaml"))
    assert "forecast_from_window" not in json.loads(first.stdout)["metrics"]  # nothing before
    on = moesim(*base, "--window", "1024:2048", "--out", str(tmp_path / "b.yaml"))
    off = moesim(*base, "--window", "1024:2048", "--no-forecast", "--out", str(tmp_path / "c.yaml"))
    m_on, m_off = json.loads(on.stdout)["metrics"], json.loads(off.stdout)["metrics"]
    assert m_on["forecast_from_window"] == "0:1024" and "forecast_from_window" not in m_off
    assert json.loads(on.stdout)["layers"] != json.loads(off.stdout)["layers"]


# ----- moesim replan ---------------------------------------------------------------------------


def test_replan_command_reports_static_full_and_limited_replans(tmp_path):
    from moesim.model.shapes import get_preset
    from moesim.placement.memory import expert_bytes
    from moesim.placement.replan import planner_for
    from moesim.traces.store import read_trace

    proc = moesim(
        "replan", "--trace", str(FLAME_TRACE), "--window-tokens", "512", "--nodes", "2",
        "--gpus-per-node", "8", "--redundant", "16", "--strategy", "affinity",
        "--max-moved-share", "0.2", "--model", "FLAME-MoE-290M", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = out["windows"]
    assert {(r["mode"], r["window"]) for r in rows} == {
        (m, w) for m in ("static", "full", "limit-0.2") for w in (1, 2, 3)
    }
    by = {(r["mode"], r["window"]): r for r in rows}
    slots = 8 * 16 * 5  # layers x devices x slots per device: 64 experts + 16 redundant
    eb = expert_bytes(get_preset("FLAME-MoE-290M"), "bf16")
    for w in (2, 3):
        assert by[("static", w)]["moved_share"] == 0.0
        assert by[("full", w)]["moved_share"] > 0.5
        assert 0 < by[("limit-0.2", w)]["moved_share"] <= 0.2
        for m in ("full", "limit-0.2"):
            r = by[(m, w)]
            assert r["migration_bytes"] == pytest.approx(r["moved_share"] * slots * eb, rel=1e-4)
    # the same figures as the replay API (window 1 is planned from window 0 alone)
    tr = read_trace(FLAME_TRACE)
    api = replay(
        tr.expert_ids, 512,
        planner_for("affinity", nodes=2, devices_per_node=8, redundant=16),
        devices_per_node=8, tokens_per_batch=512,
    )  # fmt: skip
    assert [by[("full", w)]["balance_mean"] for w in (1, 2, 3)] == [
        round(r.score["balance_mean"], 6) for r in api
    ]
    assert out["mean"]["limit-0.2"]["moved_share"] <= 0.2
    assert out["mean"]["static"]["moved_share"] == 0.0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--window-tokens", "1500"], ["window-tokens", "fewer than two windows"]),
        (["--window-tokens", "256", "--tokens-per-batch", "512"], ["tokens-per-batch", "512"]),
        (["--window-tokens", "256", "--strategy", "magic"], ["strategy", "magic"]),
        (["--window-tokens", "256", "--model", "Mixtral-8x7B"], ["model", "experts"]),
    ],
)
def test_replan_command_bad_input_is_one_line(args, needles):
    base = ["replan", "--trace", str(FLAME_TRACE), "--nodes", "2", "--gpus-per-node", "8"]
    assert_one_line_error(moesim(*base, "--redundant", "16", *args), *needles)


def test_replan_command_plans_every_expert_of_the_trace_and_rounds_its_batches(tmp_path):
    """An expert no token chose still has a home (the trace says how many experts there
    are), and the default batch is the window rounded down to a multiple of the devices."""
    ids = np.array([[[0, 1], [1, 2], [2, 0], [0, 2]] * 16] * 2, np.int32)  # expert 3 unused
    write_trace(
        RoutingTrace(
            expert_ids=ids,
            gate_weights=np.full(ids.shape, 0.5, np.float32),
            steps=np.zeros(64, np.int32),
            layers=(0, 1),
            num_experts=4,
        ),
        tmp_path / "tr",
    )
    base = ["replan", "--trace", str(tmp_path / "tr"), "--nodes", "2", "--gpus-per-node", "2"]
    proc = moesim(*base, "--window-tokens", "18", "--strategy", "greedy", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["windows"]
    assert [r["window"] for r in rows if r["mode"] == "full"] == [1, 2]  # 3 windows of 18
    proc = moesim(*base, "--window-tokens", "18", "--tokens-per-batch", "10")
    assert_one_line_error(proc, "tokens-per-batch", "multiple of the 4 devices")
