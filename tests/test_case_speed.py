"""The work a sweep case skips or shares stays exact: the topology's route table, link loads
over every pair, replica tables kept per process, a step's permute and expert times in one
call, metrics summed per (pass, layer) with array calls, and the metrics of whole cases
(pinned to what the simulator gave before these paths existed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.costs.model import cost_model_for
from moesim.costs.roofline import permute_us
from moesim.costs.work import BenchShape
from moesim.errors import InputError
from moesim.hardware import get_profile
from moesim.model.shapes import get_preset
from moesim.placement.base import Placement
from moesim.scenario import Scenario
from moesim.sim.engine import Compute, Exchange, Records
from moesim.sim.exchange import ExchangeTimes, busiest_link
from moesim.sim.metrics import metrics_frame
from moesim.sim.program import _compute_times, _MoeLayer
from moesim.sweep.run import run_case
from moesim.sweep.spec import Case, case_id
from moesim.topology import build_topology
from tests.conftest import REPO

# ----- routes and link loads ----------------------------------------------------------------


def test_routes_come_from_the_pair_table_by_the_routing_rules():
    """2 nodes x 2 H100s (links: up 0 2 4 6, down 1 3 5 7, NIC up 8 10 12 14, NIC down 9
    11 13 15): 0 → 1 stays on its NVSwitch (up 0, down 3); 0 → 2 and 1 → 3 are on one rail
    (NIC up, NIC down); 2 → 0 back (12, 9). A torus routes every pair as it did."""
    topo = build_topology(get_profile("H100-SXM"), 4, 2)
    r = topo.routes(np.array([0, 0, 1, 2]), np.array([1, 2, 3, 0]))
    assert r.indptr.tolist() == [0, 2, 4, 6, 8]
    assert r.links.tolist() == [0, 3, 8, 13, 10, 15, 12, 9]
    torus = build_topology(get_profile("TPU-v4"), 8, 8)
    src, dst = np.divmod(np.arange(64), 8)
    off = src != dst
    got, want = torus.routes(src[off], dst[off]), torus._route(src[off], dst[off])
    assert got.indptr.tolist() == want.indptr.tolist()
    assert got.links.tolist() == want.links.tolist()
    with pytest.raises(ValueError, match="distinct"):
        topo.routes(np.array([1]), np.array([1]))


def test_busiest_link_sums_every_pairs_path_by_hand():
    """Same cluster. 0 → 1: 5 copies (NVLink 0, 3 at 360 GB/s), 0 → 2: 3 (NIC 8, 13 at
    42.5), 1 → 3: 1 (NIC 10, 15), 2 → 0: 2 (NIC 12, 9); the diagonal moves nothing. Load
    per bandwidth: 3 / 42.5 on links 8 and 13, the most; the first of them is link 8."""
    topo = build_topology(get_profile("H100-SXM"), 4, 2)
    m = np.zeros((4, 4))
    m[0, 1], m[0, 2], m[1, 3], m[2, 0] = 5, 3, 1, 2
    m[0, 0] = 100  # stays on device 0
    assert busiest_link(m, topo) == (8, 3.0)
    m[2, 0] = 4  # now 4 / 42.5 on links 12 and 9: link 9 comes first
    assert busiest_link(m, topo) == (9, 4.0)
    assert busiest_link(np.diag([7.0, 1, 1, 1]), topo) is None


# ----- replica tables -----------------------------------------------------------------------


def test_replica_tables_are_shared_read_only_and_name_their_layer():
    """Layers 0 and 1 host [[0, 1], [1, 2]] (expert 1 on both devices); layer 2 hosts no
    expert 2, and its error names layer 2 though its slots' table was asked before."""
    slots = np.array([[[0, 1], [1, 2]], [[0, 1], [1, 2]], [[0, 1], [1, 0]]], dtype=np.int32)
    p = Placement(slots, 3)
    table, count = p.replicas(0)
    assert table.tolist() == [[0, -1], [0, 1], [1, -1]]
    assert count.tolist() == [1, 2, 1]
    again, _ = p.replicas(1)
    assert again is table  # one table for equal slots
    with pytest.raises(ValueError):
        table[0, 0] = 1  # shared, so not writable
    for _ in range(2):
        with pytest.raises(InputError, match="expert 2 of layer 2 is hosted by no device"):
            p.replicas(2)


# ----- a step's compute times in one call ---------------------------------------------------


@pytest.mark.parametrize("tables", [False, True])
def test_every_layers_times_at_once_equal_layer_by_layer(tables):
    """Permute and grouped-expert times of three layers from one call each are the
    per-layer calls' values bit for bit, on the roofline and on a measured table (tokens
    inside and beyond its range, fractions, idle slots)."""
    hw = get_profile("H100-SXM")
    if tables:
        name = sorted(p.name for p in (REPO / "kernels" / "measured").iterdir() if p.is_dir())[0]
        hw = hw.model_copy(update={"kernel_tables": name})
    model = cost_model_for(hw)
    assert (model.table is not None) == tables
    shape = get_preset("Mixtral-8x7B")
    rng = np.random.default_rng(5)
    tokens = rng.gamma(0.8, 900.0, size=(3, 4, 2))
    tokens[0, 1] = 0.0  # an idle device
    tokens[1, 2, 0] = 0.25  # a fraction of a token
    tokens[2, 3, 1] = 3e6  # far beyond any table
    sent = rng.integers(0, 5000, size=(3, 4)).astype(np.float32)
    layers = [_MoeLayer(sent[i], tokens[i], lambda p, e: ([], [])) for i in range(3)]
    permute, experts = _compute_times(layers, shape, hw, "bf16", model)
    bench = BenchShape.from_model(shape, local_experts=2)
    for i in range(3):
        assert permute[i].tobytes() == permute_us(sent[i], shape.d_model, hw, "bf16").tobytes()
        one = model.grouped_ffn_us(tokens[i], bench, "bf16")
        assert experts[i].tobytes() == one.tobytes()
    assert experts[0, 1] == 0.0


def test_times_scaled_by_one_are_the_same_times():
    """Scaling by 1 without reversing changes nothing; reversing swaps sent and received
    (2, 0 sent, 1, 3 received become 1, 3 sent) and keeps each device's time."""
    t = ExchangeTimes(
        np.array([5.0, 6.0]), np.array([2.0, 0.0]), np.array([1.0, 3.0]), 0,
        np.array([4.0, 5.0]), np.array([1.0, 1.0]),
    )  # fmt: skip
    assert t.scaled(1.0) is t
    back = t.scaled(1.0, reverse=True)
    assert back.sent_bytes.tolist() == [1.0, 3.0]
    assert back.recv_bytes.tolist() == [2.0, 0.0]
    assert back.time_us.tolist() == [5.0, 6.0]


# ----- metrics per (pass, layer) ------------------------------------------------------------


def test_metrics_rows_sum_each_pass_and_layer_in_program_order_by_hand():
    """Four ops on 2 devices: L0 forward other (1, 2), L1 forward expert (10, 20), L0
    forward dispatch (3, 4; sent 7, 8 bytes, received 9, 10), L0 backward other (5, 6).
    L0 forward is two ops apart: other 1, 2 and dispatch 3, 4; waits 0.5 + 0.25 on device 0;
    its start is its first op's start less its wait, its end its last op's end."""
    program = [
        Compute("a", "other", np.array([1.0, 2.0]), 0),
        Compute("b", "expert", np.array([10.0, 20.0]), 1),
        Exchange("c", "dispatch", np.array([3.0, 4.0]), None, np.array([7.0, 8.0]),
                 np.array([9.0, 10.0]), layer=0),
        Compute("d", "other", np.array([5.0, 6.0]), 0, "backward"),
    ]  # fmt: skip
    start = np.array([[0.5, 0.0], [1.0, 2.0], [11.25, 22.0], [14.25, 26.0]])
    wait = np.array([[0.5, 0.0], [0.0, 0.0], [0.25, 0.0], [0.0, 0.0]])
    dur = np.array([[1.0, 2.0], [10.0, 20.0], [3.0, 4.0], [5.0, 6.0]])
    rec = Records(start, wait, dur, events=4)
    m = metrics_frame(program, rec, {}, 3, 2, "decode")
    assert list(m.columns[:6]) == ["mode", "step", "pass", "layer", "device", "node"]
    assert m["pass"].tolist() == ["forward"] * 4 + ["backward"] * 2
    assert m["layer"].tolist() == [0, 0, 1, 1, 0, 0]
    assert m["node"].tolist() == [0, 0, 0, 0, 0, 0]
    assert m["other_us"].tolist() == [1.0, 2.0, 0.0, 0.0, 5.0, 6.0]
    assert m["dispatch_us"].tolist() == [3.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    assert m["expert_us"].tolist() == [0.0, 0.0, 10.0, 20.0, 0.0, 0.0]
    assert m["wait_us"].tolist() == [0.75, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert m["bytes_sent"].tolist() == [7.0, 8.0, 0.0, 0.0, 0.0, 0.0]
    assert m["bytes_recv"].tolist() == [9.0, 10.0, 0.0, 0.0, 0.0, 0.0]
    assert m["start_us"].tolist() == [0.0, 0.0, 1.0, 2.0, 14.25, 26.0]
    assert m["end_us"].tolist() == [14.25, 26.0, 11.0, 22.0, 19.25, 32.0]
    assert set(m["step"]) == {3} and set(m["mode"]) == {"decode"}


# ----- whole cases --------------------------------------------------------------------------


def _case(**over: object) -> Case:
    raw = {
        "name": "c",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 8},
        "model": "Mixtral-8x7B",
        "routing": {"synthetic": {"distribution": "uniform", "level": "count"}},
        "mode": "prefill",
        "tokens_per_device": 512,
        "sequence_length": 512,
        "network": {"tier": "analytic"},
        "dispatcher": "nccl-alltoallv",
        "seed": 0,
    } | over
    sc = Scenario.model_validate(raw)
    return Case(0, case_id(sc), {}, sc.model_dump(mode="json"))


#: metrics the simulator gave for these cases before any of the paths above existed
PINNED = {
    "prefill": (
        {},
        {
            "step_time_us": 24849.829544002154,
            "expert_us": 17136.588865637263,
            "dispatch_us": 1268.6847999999998,
            "other_us": 4309.3301159131115,
            "wait_us": 866.5409624517815,
            "tokens_per_s": 164830.10447806577,
            "routed_balance_mean": 1.0390975625,
            "straggler_penalty": 0.076133,
            "memory_per_device_bytes": 14689001472.0,
        },
    ),
    "decode-h200": (
        {"hardware": "H200", "mode": "decode", "tokens_per_device": 64, "sequence_length": 2048},
        {
            "step_time_us": 11742.160183531529,
            "expert_us": 3505.4252174442977,
            "combine_us": 692.3320888888888,
            "other_us": 6697.628216912726,
            "wait_us": 154.44257139672663,
            "routed_balance": 1.241667,
            "memory_per_device_bytes": 31682471936.0,
        },
    ),
    "drops": (
        {
            "capacity": {"factor": 1.0},
            "routing": {"synthetic": {"distribution": "zipf:s=1.2", "level": "count"}},
        },
        {
            "step_time_us": 24013.959754861226,
            "wait_us": 4759.483111657471,
            "tokens_per_s": 117834.23216725155,
            "routed_balance": 2.930388,
            "processed_balance": 1.483789,
            "drop_rate": 0.3091634499488885,
            "straggler_penalty": 0.43856,
        },
    ),
}


def test_case_metrics_are_what_they_were_and_repeat_in_one_process():
    """Each pinned case gives its figures exactly, and again after other cases have filled
    the per-process tables (so nothing one case keeps changes another's result)."""
    rows = {}
    for _ in range(2):
        for name, (over, want) in PINNED.items():
            row = run_case(_case(**over), str(Path(REPO)), "test")
            assert row.row["status"] == "ok", row.row["error"]
            assert {k: row.row[k] for k in want} == want, name
            if name in rows:
                assert row.row == rows[name]
            rows[name] = row.row


def test_parameter_counts_kept_per_shape_and_counted_for_unhashable_ones():
    """Mixtral-8x7B: 46,702,792,704 weights (its published 46.7 B); the same shape with
    its MoE layers listed (a list field: not hashable, so counted afresh) has as many."""
    shape = get_preset("Mixtral-8x7B")
    assert shape.total_params() == 46_702_792_704
    assert shape.total_params() == 46_702_792_704  # from the per-process table
    listed = shape.model_copy(update={"moe_layers": list(range(32))})
    with pytest.raises(TypeError):
        hash(listed)
    assert listed.total_params() == 46_702_792_704


def test_cases_of_one_cluster_share_its_topology():
    """Two cases on 8 H100s share one topology; 2:1 oversubscribed leaves (its spine
    uplinks at half the NIC's 42.5 GB/s achievable) or another profile get their own."""
    from moesim.sim.prepare import prepare

    def topo(**over: object):
        return prepare(Scenario.model_validate(_case(**over).scenario), REPO).cluster.topology

    base = topo()
    assert topo(mode="decode", tokens_per_device=64) is base
    two = {"nodes": 2, "devices_per_node": 8}
    plain = topo(cluster=two)
    over = topo(cluster=two, network={"tier": "analytic", "oversubscription": 2.0})
    assert over is not plain
    leaf_up = over.tables["leaf_up"]
    assert float(over.capacity_gbps[leaf_up].max()) == 42.5 / 2
    assert topo(hardware="H200") is not base
