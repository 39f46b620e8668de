"""Synthetic routing's level: ``auto`` (the default) runs at count level where no token
identity is needed, and every run says which level ran and why."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.hardware import get_profile
from moesim.model.shapes import get_preset
from moesim.report.summary import console_summary
from moesim.scenario import Scenario, SyntheticRouting
from moesim.sim.prepare import RoutingLevel, prepare, routing_level
from moesim.sim.simulate import simulate

TINY = {
    "name": "tiny",
    "num_layers": 2,
    "d_model": 256,
    "expert_d_ff": 512,
    "num_experts": 16,
    "top_k": 2,
    "attention": {"num_heads": 4},
    "vocab_size": 1000,
    "source": "test",
}


def _scenario(**kw) -> Scenario:
    data = {
        "name": "level",
        "hardware": "H800",
        "cluster": {"nodes": 2, "devices_per_node": 4},
        "model": TINY,
        "routing": {"synthetic": {"distribution": "zipf:1.0", "seed": 3}},
        "tokens_per_device": 256,
        "mode": "prefill",
        "dispatcher": "nccl-alltoallv",  # a copy per (token, expert): no de-duplication
    }
    return Scenario.model_validate(data | kw)


def _level(sc: Scenario) -> RoutingLevel:
    shape = get_preset(sc.model) if isinstance(sc.model, str) else sc.model
    return routing_level(sc, shape, sc.dispatcher.resolve(get_profile(sc.hardware)))


def test_auto_is_the_default():
    assert SyntheticRouting().level == "auto"


def test_auto_runs_count_level_without_token_identity():
    assert _level(_scenario()) == RoutingLevel("count", "auto: no token identity needed")
    # placements blind to the loads, and replica choices whose expected shares count
    # level draws, keep it at count level
    for kw in (
        {"placement": "round-robin"},
        {"placement": "contiguous", "redundant_slots": 8, "replica_choice": "round-robin"},
        {"capacity": {"factor": None, "overflow": "reroute"}},  # nothing overflows
        {"overlap": True, "stragglers": {"jitter": 0.1}, "network": {"tier": "flow"}},
    ):
        assert _level(_scenario(**kw)).level == "count", kw


def _syn(**kw) -> dict:
    return {"synthetic": {"distribution": "zipf:1.0", "seed": 3} | kw}


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        (
            {"dispatcher": "deepep-normal"},
            "dispatcher deepep-normal sends one copy per (token, node)",
        ),
        (
            {"dispatcher": {"preset": "nccl-alltoallv", "dedup": "device"}},
            "dispatcher nccl-alltoallv sends one copy per (token, device)",
        ),
        ({"dispatcher": "auto"}, "dispatcher deepep-normal sends one copy per (token, node)"),
        ({"capacity": {"factor": 1.25}}, "capacity factor 1.25 (drop) overflows in token order"),
        (
            {"capacity": {"factor": 1.0, "overflow": "reroute"}},
            "capacity factor 1.0 (reroute) overflows in token order",
        ),
        ({"placement": "greedy"}, "placement greedy is planned from the drawn tokens"),
        ({"placement": "affinity"}, "placement affinity is planned from the drawn tokens"),
        (
            {"redundant_slots": 8, "replica_choice": "least-loaded"},
            "replica_choice least-loaded splits the tokens themselves",
        ),
        (
            {"replica_choice": "batch-split"},
            "replica_choice batch-split splits the tokens themselves",
        ),
        (
            {"model": TINY | {"expert_groups": 4, "groups_per_token": 2}},
            "tiny's group limit under non-uniform popularity",
        ),
    ],
)
def test_auto_keeps_token_level_where_it_changes_the_answer(kw, reason):
    assert _level(_scenario(**kw)) == RoutingLevel("token", f"auto: {reason}")


def test_auto_count_level_needs_what_the_scenario_has():
    """Drift and burst (both levels draw step s from step s's popularity), and a group
    limit under uniform popularity, draw the same law at either level."""
    for dist, steps in (("drift:s=1,speed=2", 1), ("drift:s=1,speed=2", 2), ("burst", 3)):
        sc = _scenario(routing=_syn(distribution=dist), steps=steps)
        assert _level(sc).level == "count", (dist, steps)
    grouped = _scenario(
        model=TINY | {"expert_groups": 4, "groups_per_token": 2},
        routing=_syn(distribution="uniform"),
    )
    assert _level(grouped).level == "count"


def test_token_level_draws_each_step_from_its_own_popularity(tmp_path):
    """drift:speed=4 rotates the ranking by 4 experts a step, so the hottest expert of
    step 1's tokens is the one 4 after step 0's (mod 16), in every layer."""
    sc = _scenario(routing=_syn(distribution="drift:s=3,speed=4", level="token"), steps=2)
    prep = prepare(sc, tmp_path)
    n = sc.cluster.num_devices * sc.tokens_per_device  # tokens a step
    for li in range(len(prep.moe_layers)):
        ids = prep.trace.layer_ids(li, np.arange(2 * n))
        hot = [
            int(np.bincount(ids[s * n : (s + 1) * n].ravel(), minlength=16).argmax())
            for s in (0, 1)
        ]
        assert hot[1] == (hot[0] + 4) % 16, (li, hot)


def test_a_written_level_is_taken_as_written():
    for level in ("token", "count"):
        sc = _scenario(routing=_syn(level=level))
        assert _level(sc) == RoutingLevel(level, "set in the scenario")
    # token level even where count level would do; count level refused where it cannot
    sc = _scenario(routing=_syn(level="count"), dispatcher="deepep-normal")
    assert _level(sc) == RoutingLevel("count", "set in the scenario")


def test_runs_state_the_level_and_auto_runs_what_it_names(tmp_path):
    auto = simulate(_scenario(), tmp_path)
    s = auto.runs[0].summary
    assert (s["routing_level"], s["routing_level_reason"]) == (
        "count",
        "auto: no token identity needed",
    )
    assert "routing level: count (auto: no token identity needed)" in console_summary(auto)
    count = simulate(_scenario(routing=_syn(level="count")), tmp_path).runs[0].summary
    assert count["step_time_us"] == s["step_time_us"]
    assert count["processed_balance"] == s["processed_balance"]
    assert count["routing_level_reason"] == "set in the scenario"
    # de-duplicating dispatcher: token level, the same run as level: token
    kw = {"dispatcher": "deepep-normal"}
    tok_auto = simulate(_scenario(**kw), tmp_path)
    tok = simulate(_scenario(routing=_syn(level="token"), **kw), tmp_path).runs[0].summary
    s = tok_auto.runs[0].summary
    assert (s["routing_level"], s["step_time_us"]) == ("token", tok["step_time_us"])
    assert "routing level: token (auto: dispatcher deepep-normal sends one copy per " in (
        console_summary(tok_auto)
    )


def test_a_trace_has_no_routing_level(tmp_path, flame_dict):
    run = simulate(Scenario.model_validate(flame_dict), tmp_path).runs[0]
    assert (run.summary["routing_level"], run.summary["routing_level_reason"]) == (None, None)
