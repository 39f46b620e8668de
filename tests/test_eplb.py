"""DeepSeek EPLB as published: hand-checked building blocks, and the planners
``eplb-global`` / ``eplb-hierarchical`` against the outputs of DeepSeek's own code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.placement.eplb import balanced_packing, rebalance, replicate_experts
from moesim.placement.planners import plan

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REFERENCE = REFERENCE / "eplb_reference_outputs.json"


def test_balanced_packing_heaviest_first_to_the_lightest_pack_with_room():
    # 5 4 3 3 2 1 (items 1 3 0 4 5 2; equal weights: lower index first) into 2 packs of 3:
    # 5 -> p0, 4 -> p1, 3 (item 0) -> p1 (4 < 5), 3 (item 4) -> p0 (5 < 7),
    # 2 -> p1 (7 < 8), now full, 1 -> p0
    w = np.array([[3.0, 5.0, 1.0, 4.0, 3.0, 2.0]], dtype=np.float32)
    pack, rank = balanced_packing(w, 2)
    assert pack.tolist() == [[1, 0, 0, 1, 0, 1]]
    assert rank.tolist() == [[1, 0, 2, 0, 1, 2]]


def test_balanced_packing_with_one_item_per_pack_keeps_the_order():
    pack, rank = balanced_packing(np.array([[1.0, 9.0]], dtype=np.float32), 2)
    assert pack.tolist() == [[0, 1]] and rank.tolist() == [[0, 0]]


def test_replicate_experts_adds_to_the_largest_load_per_replica():
    # 9 3: 9 -> 4.5 (2 copies), 4.5 > 3 -> 3 (3 copies), tie 3 vs 3 -> expert 0 (4 copies)
    phy2log, logcnt = replicate_experts(np.array([[9.0, 3.0]], dtype=np.float32), 5)
    assert phy2log.tolist() == [[0, 1, 0, 0, 0]]
    assert logcnt.tolist() == [[4, 1]]


def test_ties_keep_the_order_of_eplbs_sort():
    # 17 equal weights (more than the final insertion sort alone handles): the pivot (the
    # median of places 1, 8, 16, all equal: item 8) swaps with item 0, then the Hoare
    # partition swaps places 1<->16, 2<->15, ..., 8<->9 and stops at place 9; both parts
    # have at most 16 items and the insertion sort moves no equal key
    from moesim.placement.eplb import _introsort_order

    order = _introsort_order([1.0] * 17)
    assert order == [8, 16, 15, 14, 13, 12, 11, 10, 9, 0, 7, 6, 5, 4, 3, 2, 1]


def test_rebalance_uses_the_global_policy_when_groups_do_not_divide_over_nodes():
    w = np.array([[1.0, 3.0, 4.0, 2.0]])
    glob = rebalance(w, 4, 1, 1, 2)
    for groups, nodes in ((1, 2), (2, 4)):
        got = rebalance(w, 4, groups, nodes, 2)
        assert all((a == b).all() for a, b in zip(got, glob, strict=True))
    # global: items heaviest first 4 3 2 1 -> GPU 0 4+1, GPU 1 3+2
    assert glob[0].tolist() == [[2, 0, 1, 3]]


def _cases() -> list[dict]:
    if not REFERENCE.exists():
        return []
    return json.loads(REFERENCE.read_text())["cases"]


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"EPLB reference outputs absent: {REFERENCE}")
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c['name']}-{c['policy']}")
def test_planners_reproduce_deepseek_eplb(case):
    """Same replica counts, same per-GPU loads, and the same physical slots (GPU-major, in
    the same order within each GPU) as DeepSeek's ``rebalance_experts`` on the reference
    inputs."""
    w = np.array(case["weight"], dtype=np.float64)  # (L, E)
    ref = np.array(case["phy2log"])  # (L, P)
    logcnt = np.array(case["logcnt"])  # (L, E)
    d, nodes = case["num_gpus"], case["num_nodes"]
    num_layers, e = w.shape
    s = case["num_replicas"] // d
    kw = {"nodes": nodes, "devices_per_node": d // nodes, "redundant": case["num_replicas"] - e}
    if case["policy"] == "global":
        p = plan(w, "eplb-global", **kw)
    else:
        p = plan(w, "eplb-hierarchical", groups=case["num_groups"], **kw)
    count = np.stack([np.bincount(p.slots[li].ravel(), minlength=e) for li in range(num_layers)])
    assert (count == logcnt).all()
    share = w / logcnt  # (L, E) load per replica

    def gpu_loads(slots: np.ndarray) -> np.ndarray:  # (L, D, S) -> (L, D) sorted
        return np.sort(np.take_along_axis(share, slots.reshape(num_layers, -1), axis=1)
                       .reshape(num_layers, d, s).sum(axis=2), axis=1)  # fmt: skip

    ref_slots = ref.reshape(num_layers, d, s)
    assert np.abs(gpu_loads(p.slots) - gpu_loads(ref_slots)).max() <= 1e-6
    assert (np.sort(p.slots, axis=2) == np.sort(ref_slots, axis=2)).all()
    assert (p.slots.reshape(num_layers, -1) == ref).all()


def test_rebalance_weighs_in_float32_as_eplb_does():
    """EPLB casts the loads to float32 (``weight.float()``), which cannot tell 2^24 from
    2^24 + 1: the two experts tie and the spare replica goes to the first, expert 0
    (in float64 it would go to expert 1)."""
    phy2log, logcnt = rebalance(np.array([[16_777_216, 16_777_217]]), 3, 1, 1, 1)
    assert logcnt.tolist() == [[2, 1]]
    assert sorted(phy2log[0].tolist()) == [0, 0, 1]
