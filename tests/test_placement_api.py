"""moesim.placement.api: what ``moesim place`` and ``moesim replan`` compute, called from
Python, with hand-checked answers on tiny inputs; the commands print exactly that."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.placement.api import plan_placement, replan_trace
from moesim.traces.store import RoutingTrace, write_trace
from tests.conftest import run_moesim as moesim


def test_greedy_on_four_experts_and_two_devices():
    # loads 4, 1, 2, 1; two slots per device. Greedy, heaviest first onto the lighter
    # device with a free slot: e0 (4) -> d0, e2 (2) -> d1, e1 (1) -> d1 (2 < 4), d1 is
    # then full, so e3 (1) -> d0. Device loads 4 + 1 = 5 and 2 + 1 = 3, mean 4.
    plan = plan_placement(
        loads=np.array([[4.0, 1.0, 2.0, 1.0]]), nodes=1, devices_per_node=2, strategy="greedy"
    )
    assert plan.placement.slots.tolist() == [[[0, 3], [2, 1]]]
    assert plan.device_loads.tolist() == [[5.0, 3.0]]
    m = plan.metrics
    assert (m["devices"], m["slots_per_device"], m["redundant"]) == (2, 2, 0)
    assert m["planned_balance_max"] == m["planned_balance_mean"] == 5 / 4
    assert plan.layers is None  # an array names no model layers


def test_replicas_split_their_expert_load():
    # 2 redundant slots, 3 per device: the hot expert (6) gets three replicas of 2 each;
    # d0 holds two of them and e1 (2 + 2 + 1 = 5), d1 one, e2 and e3 (2 + 2 + 1 = 5)
    plan = plan_placement(
        loads=np.array([6.0, 1.0, 2.0, 1.0]),  # one layer, given as a 1-D array
        nodes=1,
        devices_per_node=2,
        redundant=2,
        strategy="eplb-global",
    )
    slots = plan.placement.slots[0]
    assert sorted(slots.ravel().tolist()) == [0, 0, 0, 1, 2, 3]
    assert plan.device_loads.tolist() == [[5.0, 5.0]]
    assert plan.metrics["planned_balance_max"] == 1.0


def test_bad_loads_array_names_the_layer_and_expert():
    with pytest.raises(InputError, match=r"field 'layer 1, expert 2': value -1.0"):
        plan_placement(loads=np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0]]))


def _windows_trace() -> RoutingTrace:
    """4 experts, top-1, three windows of 4 tokens: window 0 routes to experts 0, 0, 1, 2
    (loads 2, 1, 1, 0), windows 1 and 2 to 1, 1, 2, 2 (loads 0, 2, 2, 0)."""
    ids = np.array([0, 0, 1, 2, 1, 1, 2, 2, 1, 1, 2, 2], dtype=np.int32).reshape(1, 12, 1)
    return RoutingTrace(ids, np.ones((1, 12, 1), np.float32), np.zeros(12, np.int32), (5,), 4)


def test_replan_scores_each_window_with_the_plan_of_the_one_before():
    # Greedy from window 0 (loads 2, 1, 1, 0): e0 -> d0, e1 -> d1, e2 -> d1, e3 -> d0, so
    # experts 1 and 2 share d1: windows 1 and 2 put all 4 tokens there, balance 4 / 2 = 2.
    # The full re-plan from window 1 (loads 0, 2, 2, 0) puts e1 and e2 on different
    # devices: window 2 balances (2 / 2 = 1) after moving one slot on each device (2 of
    # 4). A limit of 1 slot (0.25) cannot split them without losing an expert: no move.
    res = replan_trace(
        _windows_trace(),
        window_tokens=4,
        nodes=1,
        devices_per_node=2,
        strategy="greedy",
        forecast=False,
        max_moved_share=0.25,
    )
    assert res.modes == ["static", "full", "limit-0.25"]
    assert (res.num_windows, res.tokens_per_batch) == (3, 4)
    got = {(r["mode"], r["window"]): (r["balance_mean"], r["moved_share"]) for r in res.windows}
    assert got == {
        ("static", 1): (2.0, 0.0),
        ("static", 2): (2.0, 0.0),
        ("full", 1): (2.0, 0.0),
        ("full", 2): (1.0, 0.5),
        ("limit-0.25", 1): (2.0, 0.0),
        ("limit-0.25", 2): (2.0, 0.0),
    }
    assert [r["tokens"] for r in res.windows[:2]] == ["4:8", "8:12"]
    assert res.mean["full"]["balance_mean"] == 1.5
    assert res.mean["static"]["balance_p99"] == 2.0
    assert all(r["remote_nodes_per_token"] == 0.0 for r in res.windows)  # one node


def test_the_commands_print_what_the_functions_return(tmp_path):
    tr = _windows_trace()
    write_trace(tr, tmp_path / "t")
    proc = moesim(
        "replan",
        "--trace",
        str(tmp_path / "t"),
        "--window-tokens",
        "4",
        "--gpus-per-node",
        "2",
        "--strategy",
        "greedy",
        "--no-forecast",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    want = replan_trace(
        tr, window_tokens=4, nodes=1, devices_per_node=2, strategy="greedy", forecast=False
    )
    assert json.loads(proc.stdout) == want.to_json()

    np.save(tmp_path / "l.npy", np.array([[4.0, 1.0, 2.0, 1.0]]))
    out = tmp_path / "p.yaml"
    args = ("--loads", str(tmp_path / "l.npy"), "--gpus-per-node", "2", "--strategy", "greedy")
    proc = moesim("place", *args, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = plan_placement(loads=tmp_path / "l.npy", nodes=1, devices_per_node=2, strategy="greedy")
    got = json.loads(proc.stdout)
    del got["metrics"]["plan_ms"]  # a timing
    want_json = plan.to_json()
    del want_json["metrics"]["plan_ms"]
    assert got == want_json
    plan.write(tmp_path / "q.yaml")
    assert (tmp_path / "q.yaml").read_bytes() == out.read_bytes()


def test_a_refine_step_replaces_the_plan_and_its_figures():
    # greedy on loads 4, 2, 1, 1: d0 {e0, e3} = 5, d1 {e1, e2} = 3; a refine step that
    # returns the contiguous plan, d0 {e0, e1} = 6, d1 {e2, e3} = 2: balance 6 / 4 = 1.5
    from dataclasses import dataclass

    from moesim.placement.base import Placement, contiguous

    @dataclass
    class Refined:
        placement: Placement
        mode: str = "training"
        step_time_us_before: float = 10.0
        step_time_us_after: float = 8.0
        swaps_kept: int = 1

    seen = []

    def refine(p: Placement) -> Refined:
        seen.append(p.slots.tolist())
        return Refined(contiguous(4, 2, 1))

    plan = plan_placement(
        loads=np.array([[4.0, 2.0, 1.0, 1.0]]),
        devices_per_node=2,
        strategy="greedy",
        refine=refine,
    )
    assert seen == [[[[0, 3], [1, 2]]]]  # the greedy plan went in
    assert plan.placement.slots.tolist() == [[[0, 1], [2, 3]]]
    assert plan.device_loads.tolist() == [[6.0, 2.0]]
    m = plan.metrics
    assert m["planned_balance_max"] == 1.5
    assert (m["refine_mode"], m["step_time_us_before"], m["step_time_us_after"]) == (
        "training",
        10.0,
        8.0,
    )
    assert m["refine_swaps_kept"] == 1
