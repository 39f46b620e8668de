"""Streaming store, importers, stats and synth: behaviour and bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.errors import InputError
from moesim.traces.importers import counts_to_assignments, import_trace, load_counts_json
from moesim.traces.stats import layer_pair_counts, trace_stats
from moesim.traces.store import (
    TraceWriter,
    check_layer,
    iter_batches,
    iter_layer_batches,
    open_trace,
    read_trace,
)
from moesim.traces.synthetic import parse_distribution, synth_to_store, synthesize
from moesim.traces.window import read_replay
from tests.conftest import REPO
from tests.conftest import assert_one_line_error as one_line_error
from tests.conftest import run_moesim as moesim

COUNTS_JSON = REPO.parent / "shared" / "data" / "olmoe_mixtral_expert_counts_L0_7_15.json"


# ----- streaming store ---------------------------------------------------------------------


def test_writer_streams_chunks_and_reader_walks_layers_in_lockstep(tmp_path):
    rng = np.random.default_rng(0)
    ids = {la: rng.integers(0, 8, size=(1000, 1)) for la in (3, 5)}
    with TraceWriter(tmp_path / "t", num_experts=8, top_k=1, layers=[3, 5]) as w:
        for start in range(0, 1000, 300):  # uneven chunks
            tok = np.arange(start, min(start + 300, 1000))
            for la in (3, 5):
                w.write(la, ids[la][tok], token=tok, step=start // 500)
    info = open_trace(tmp_path / "t")
    assert info.layers == (3, 5) and info.num_tokens == 1000
    got = {3: [], 5: []}
    for group in iter_batches(info, batch_rows=128):
        assert group[3].token.tolist() == group[5].token.tolist()
        for la in (3, 5):
            got[la].append(group[la].expert_ids)
    for la in (3, 5):
        np.testing.assert_array_equal(np.concatenate(got[la]), ids[la])
    t = read_trace(tmp_path / "t")
    assert t.steps.tolist() == [0] * 600 + [1] * 400  # chunks start at 0, 300 | 600, 900
    np.testing.assert_allclose(t.gate_weights, 1.0)  # top-1, weights not given -> 1/k


def test_writer_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "t"
    with pytest.raises(RuntimeError), TraceWriter(out, num_experts=4, top_k=1, layers=[0]) as w:
        w.write(0, np.zeros((5, 1), int), token=np.arange(5))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_unequal_layers_and_keeps_old_trace(tmp_path):
    out = tmp_path / "t"
    synth_to_store(out, num_experts=4, top_k=1, num_layers=1, num_tokens=10)
    before = read_trace(out).expert_ids.copy()
    with (
        pytest.raises(InputError, match="same, non-zero number of rows"),
        TraceWriter(out, num_experts=4, top_k=1, layers=[0, 1]) as w,
    ):
        w.write(0, np.zeros((5, 1), int), token=np.arange(5))
    np.testing.assert_array_equal(read_trace(out).expert_ids, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_writer_rejects_bad_rows(tmp_path):
    with TraceWriter(tmp_path / "t", num_experts=4, top_k=2, layers=[0]) as w:
        with pytest.raises(InputError, match="expert id out of range"):
            w.write(0, np.array([[0, 4]]), token=np.arange(1))
        with pytest.raises(InputError, match=r"expert_ids must be \(rows, 2\)"):
            w.write(0, np.array([[0, 1, 2]]), token=np.arange(1))
        with pytest.raises(InputError, match="gate weights"):
            w.write(0, np.array([[0, 1]]), np.array([[0.5, np.nan]]), token=np.arange(1))
        w.write(0, np.array([[0, 1]]), token=np.arange(1))


def _hand_trace(path, tokens=(0, 1, 2)):
    """3 tokens, top-2, 4 experts, layers 0 and 1, rows written with the given token ids."""
    l0 = np.array([[0, 1], [1, 0], [2, 3]])
    l1 = np.array([[1, 2], [1, 3], [0, 1]])
    with TraceWriter(path, num_experts=4, top_k=2, layers=[0, 1]) as w:
        w.write(0, l0, token=np.array(tokens))
        w.write(1, l1, token=np.array(tokens))
    return path


def test_layer_batches_walk_one_layer_after_another(tmp_path):
    info = open_trace(_hand_trace(tmp_path / "t"))
    got = [(b.layer, b.start, b.expert_ids.tolist()) for b in iter_layer_batches(info, None, 2)]
    assert got == [
        (0, 0, [[0, 1], [1, 0]]),
        (0, 2, [[2, 3]]),
        (1, 0, [[1, 2], [1, 3]]),
        (1, 2, [[0, 1]]),
    ]


def test_replay_keeps_the_replayed_tokens_in_token_order_and_whole_trace_counts(tmp_path):
    # rows hold tokens 20, 5, 9: in token order the rows are 1 (token 5), 2 (9), 0 (20)
    r = read_replay(_hand_trace(tmp_path / "t", (20, 5, 9)), 2, pairs=True)
    assert r.num_tokens == 3 and r.layers == (0, 1) and r.expert_ids.dtype == np.uint8
    assert r.expert_ids.tolist() == [[[1, 0], [2, 3]], [[1, 3], [0, 1]]]
    assert r.layer_ids(1, np.array([1, 0, 1])).tolist() == [[0, 1], [1, 3], [0, 1]]
    with pytest.raises(ValueError, match="only the first 2 tokens"):
        r.layer_ids(0, np.array([2]))
    # loads over all 3 tokens: layer 0 picks 0,1 | 1,0 | 2,3; layer 1 picks 1,2 | 1,3 | 0,1
    assert r.loads.tolist() == [[2, 2, 1, 1], [1, 3, 1, 1]]
    assert r.coactivation is not None
    coact, cross = r.coactivation
    want = np.zeros((2, 4, 4))
    for layer, pairs in enumerate([[(0, 1), (0, 1), (2, 3)], [(1, 2), (1, 3), (0, 1)]]):
        for i, j in pairs:
            want[layer, i, j] += 1
            want[layer, j, i] += 1
    np.testing.assert_array_equal(coact, want)
    # (layer-0 expert, layer-1 expert) of the same token: {0,1}x{1,2}, {1,0}x{1,3}, {2,3}x{0,1}
    hand = np.zeros((4, 4))
    for a, b in [((0, 1), (1, 2)), ((1, 0), (1, 3)), ((2, 3), (0, 1))]:
        for i in a:
            for j in b:
                hand[i, j] += 1
    np.testing.assert_array_equal(cross[0], hand)
    assert read_replay(tmp_path / "t").expert_ids.shape == (2, 3, 2)  # None: every token


def test_replay_and_stats_check_every_layer_past_the_replayed_tokens(tmp_path):
    path = _hand_trace(tmp_path / "t")
    part = path / "layer=1" / "part-0.parquet"
    table = pq.read_table(part)
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("token"), "token", pa.array([0, 1, 7], pa.int64())
        ),
        part,
    )
    for read in (lambda: read_replay(path, 1), lambda: trace_stats(path)):
        with pytest.raises(InputError, match="layers hold different tokens"):
            read()
    ids = pa.array([[1, 2], [1, 3], [0, 9]], table.schema.field("expert_ids").type)
    pq.write_table(
        table.set_column(table.schema.get_field_index("expert_ids"), "expert_ids", ids), part
    )
    for read in (lambda: read_replay(path, 1), lambda: trace_stats(path)):
        with pytest.raises(InputError, match=r"out of range 0..3 \(layer 1, row 2\)") as e:
            read()
        assert e.value.value == 9 and "layer=1" in str(e.value.file)


# ----- synthetic ---------------------------------------------------------------------------


def test_parse_distribution():
    assert str(parse_distribution("zipf:0.8")) == "zipf:s=0.8"
    assert parse_distribution("drift:s=1,speed=0.5").params == {"s": 1.0, "speed": 0.5}
    for bad in ("pareto", "zipf:x", "zipf:s=1,q=2", "burst:p=2", "dirichlet:0"):
        with pytest.raises(InputError, match="dist"):
            parse_distribution(bad)


def test_drift_moves_the_hot_expert_and_burst_spikes():
    t = synthesize(
        num_experts=32,
        top_k=2,
        num_layers=1,
        num_tokens=20000,
        steps=4,
        distribution="drift:s=1.5,speed=3",
        seed=0,
    )
    hot = [
        int(np.bincount(t.expert_ids[0][t.steps == s].ravel(), minlength=32).argmax())
        for s in range(4)
    ]
    assert [(h - hot[0]) % 32 for h in hot] == [0, 3, 6, 9]
    b = synthesize(
        num_experts=32,
        top_k=2,
        num_layers=1,
        num_tokens=20000,
        steps=8,
        distribution="burst:s=0,p=0.5,factor=30",
        seed=0,
    )
    counts = [np.bincount(b.expert_ids[0][b.steps == s].ravel(), minlength=32) for s in range(8)]
    ratios = [c.max() / c.mean() for c in counts]
    assert min(ratios) < 1.3 < 3 < max(ratios)  # uniform steps and burst steps


def test_synth_store_equals_memory(tmp_path):
    kw = dict(
        num_experts=16,
        top_k=4,
        num_layers=2,
        num_tokens=5000,
        distribution="dirichlet:0.3",
        steps=3,
        seed=7,
    )
    synth_to_store(tmp_path / "s", **kw)
    a, b = read_trace(tmp_path / "s"), synthesize(**kw)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.steps, b.steps)


# ----- importers ---------------------------------------------------------------------------


def test_vllm_npy_import(tmp_path):
    src = tmp_path / "req"
    src.mkdir()
    rng = np.random.default_rng(1)
    reqs = [rng.permuted(np.tile(np.arange(16), (n, 3, 1)), axis=2)[:, :, :4] for n in (7, 5)]
    for i, r in enumerate(reqs):
        np.save(src / f"{i:03d}.npy", r.astype(np.int32))
    out = import_trace("vllm-npy", src, tmp_path / "t", num_experts=16, layers=[1, 3, 5])
    t = read_trace(out)
    assert t.layers == (1, 3, 5) and t.num_tokens == 12
    np.testing.assert_array_equal(t.expert_ids[1], np.concatenate([r[:, 1] for r in reqs]))
    seq = pq.read_table(out / "layer=1" / "part-0.parquet").column("sequence").to_pylist()
    assert seq == [0] * 7 + [1] * 5


def test_vllm_npy_bad_input(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 2), np.int32))
    with pytest.raises(InputError, match="shape"):
        import_trace("vllm-npy", tmp_path / "a.npy", tmp_path / "t", num_experts=4)
    np.save(tmp_path / "b.npy", np.full((3, 1, 2), 9, np.int32))
    with pytest.raises(InputError, match="out of range"):
        import_trace("vllm-npy", tmp_path / "b.npy", tmp_path / "t", num_experts=4)
    assert not (tmp_path / "t").exists()


def test_counts_to_assignments_is_exact():
    counts = np.array([10, 0, 3, 7, 10, 2])  # 32 = 16 tokens x top-2, max 10 <= 16
    ids = counts_to_assignments(counts, 2, np.random.default_rng(0))
    assert ids.shape == (16, 2)
    assert (ids[:, 0] != ids[:, 1]).all()
    np.testing.assert_array_equal(np.bincount(ids.ravel(), minlength=6), counts)
    with pytest.raises(InputError, match="multiple of top_k"):
        counts_to_assignments(np.array([3, 2]), 2, np.random.default_rng(0))
    with pytest.raises(InputError, match="more than the"):
        counts_to_assignments(np.array([4, 0]), 2, np.random.default_rng(0))


def test_counts_json_import_small(tmp_path):
    data = {"m": {"expert_counts": {"d": [{"0": 4, "1": 2, "2": 2}, {"0": 1, "2": 7}]}}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    layers, counts = load_counts_json(tmp_path / "c.json", model="m", domain="d", num_experts=4)
    assert layers == [0, 1] and counts.tolist() == [[4, 2, 2, 0], [1, 0, 7, 0]]
    t = read_trace(
        import_trace(
            "counts-json",
            tmp_path / "c.json",
            tmp_path / "t",
            model="m",
            domain="d",
            top_k=1,
            num_experts=4,
        )
    )
    assert [
        np.bincount(t.expert_ids[i].ravel(), minlength=4).tolist() for i in range(2)
    ] == counts.tolist()
    with pytest.raises(InputError, match="valid: m"):
        load_counts_json(tmp_path / "c.json", model="x", domain="d")


def test_counts_json_top_k_from_its_metadata(tmp_path):
    """OLMoE's counts file says each model's top-k in _meta.models: no --top-k needed."""
    from moesim.traces.importers import counts_top_k

    data = {
        "_meta": {"models": {"m": "allenai/x: 2 MoE layers, 4 experts, top-2"}},
        "m": {"expert_counts": {"d": [{"0": 4, "1": 2, "2": 2}, {"0": 3, "2": 3, "3": 2}]}},
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert counts_top_k(tmp_path / "c.json", "m") == 2
    assert counts_top_k(tmp_path / "c.json", "other") is None
    t = read_trace(
        import_trace("counts-json", tmp_path / "c.json", tmp_path / "t", model="m", domain="d")
    )
    # 8 assignments per layer at top-2: 4 tokens
    assert (t.top_k, t.num_tokens) == (2, 4)


@pytest.mark.skipif(not COUNTS_JSON.exists(), reason="shared data not present")
def test_counts_json_real_olmoe(tmp_path):
    t = read_trace(
        import_trace(
            "counts-json", COUNTS_JSON, tmp_path / "t", model="olmoe", domain="arxiv", top_k=8
        )
    )
    assert t.layers == (0, 7, 15) and t.num_tokens == 208_896
    c = np.stack([np.bincount(t.expert_ids[i].ravel(), minlength=64) for i in range(3)])
    # hottest / mean per the data README: 7.81 / 6.28 / 7.49
    np.testing.assert_allclose(c.max(axis=1) / c.mean(axis=1), [7.81, 6.28, 7.49], atol=0.006)


# ----- stats -------------------------------------------------------------------------------


def test_stats_hand_checked(tmp_path):
    # 3 tokens, top-2, two layers
    l0 = np.array([[0, 1], [1, 0], [2, 3]])
    l1 = np.array([[1, 2], [1, 3], [0, 1]])
    with TraceWriter(tmp_path / "t", num_experts=4, top_k=2, layers=[0, 1]) as w:
        w.write(0, l0, token=np.arange(3))
        w.write(1, l1, token=np.arange(3))
    s = trace_stats(tmp_path / "t", top=3)
    a, b = s["layers"]
    assert a["expert_counts"] == [2, 2, 1, 1] and b["expert_counts"] == [1, 3, 1, 1]
    assert a["expert_balance"] == pytest.approx(2 / 1.5)  # max 2 over mean 6 / 4
    p = np.array([2, 2, 1, 1]) / 6
    assert a["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-6)
    assert a["top_coactivated_pairs"][0]["experts"] == [0, 1]
    assert a["top_coactivated_pairs"][0]["count"] == 2
    # token pairs across layers: (0|1,1|2) -> 0-1,0-2,1-1,1-2 ; (1|0,1|3) -> 1-1,1-3,0-1,0-3 ;
    # (2|3,0|1) -> 2-0,2-1,3-0,3-1 ; strongest: 0->1 and 1->1 twice each
    aff = a["top_next_layer_affinities"]
    assert {tuple(x["experts"]) for x in aff[:2]} == {(0, 1), (1, 1)}
    assert aff[0]["count"] == 2 and aff[0]["p_given_first"] == pytest.approx(0.5)
    assert "top_next_layer_affinities" not in b


def _layer_counts_reference(ids, prev, e):
    """The numpy form of the compiled counts: one np.bincount over integer keys per slot."""
    k = ids.shape[1]
    ids = np.sort(ids, axis=1).astype(np.intp)
    counts = np.bincount(ids.reshape(-1), minlength=e)
    pairs = np.zeros(e * e, dtype=np.intp)
    for i in range(k - 1):
        pairs += np.bincount((ids[:, i : i + 1] * e + ids[:, i + 1 :]).reshape(-1), minlength=e * e)
    if prev is None:
        return counts, pairs.reshape(e, e), None
    cross = np.zeros(e * e, dtype=np.intp)
    for i in range(k):
        cross += np.bincount(
            (prev.astype(np.intp)[:, i : i + 1] * e + ids).reshape(-1), minlength=e * e
        )
    return counts, pairs.reshape(e, e), cross.reshape(e, e)


def test_layer_pair_counts_hand_checked():
    """Tokens {2, 0} and {1, 2} of 3 experts, after {0, 1} and {2, 1}: counts 1, 1, 2; pairs
    (0, 2) and (1, 2) once each (lower id first); cross pairs 0-2, 0-0, 1-2, 1-0 from the
    first token and 2-1, 2-2, 1-1, 1-2 from the second."""
    c, p, x = layer_pair_counts(np.array([[2, 0], [1, 2]]), np.array([[0, 1], [2, 1]]), 3)
    assert c.tolist() == [1, 1, 2]
    assert p.tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]
    assert x is not None and x.tolist() == [[1, 0, 1], [1, 1, 2], [0, 1, 1]]
    assert layer_pair_counts(np.array([[2, 0]]), None, 3)[2] is None


@pytest.mark.parametrize(
    ("e", "k", "dtype", "prev_dtype"),
    [(256, 8, np.int32, np.uint8), (300, 2, np.int64, np.uint16), (8, 1, np.int32, np.int32)],
)
def test_layer_pair_counts_equal_the_numpy_form(e, k, dtype, prev_dtype):
    rng = np.random.default_rng(e)
    ids, prev = (np.argsort(rng.random((2, 5000, e)), axis=2)[..., :k]).astype(dtype)
    prev = prev.astype(prev_dtype)
    want_all = _layer_counts_reference(ids, prev, e)
    for got, want in zip(layer_pair_counts(ids, prev, e), want_all, strict=True):
        assert got.dtype == np.int64 and np.array_equal(got, want)
    assert np.array_equal(
        layer_pair_counts(ids, None, e)[1], _layer_counts_reference(ids, None, e)[1]
    )


@pytest.mark.parametrize("k", [2, 5, 12, 13, 20])
def test_check_layer_names_the_first_row_with_an_expert_twice(k):
    """Both ways of finding repeats (column pairs up to K = 12, sorted rows beyond) name
    the first row holding one, wherever in the row the two copies sit."""
    ids = np.tile(np.arange(k), (6, 1))
    ids[4, [0, k - 1]] = ids[4, [k - 1, 0]]  # a swap: still no repeat
    ids[3, k - 1] = ids[3, 0]
    ids[5, 1] = ids[5, 0]
    with pytest.raises(InputError, match=r"row 3\)") as err:
        check_layer(ids, np.empty((0, k)), k, 7, "x.parquet")
    assert f"value {[int(v) for v in ids[3]]}:" in str(err.value)
    check_layer(ids[:3], np.empty((0, k)), k, 7, "x.parquet")


# ----- CLI ---------------------------------------------------------------------------------


def test_cli_synth_stats_import(tmp_path):
    proc = moesim(
        "trace",
        "synth",
        "--experts",
        "16",
        "--top-k",
        "2",
        "--layers",
        "3",
        "--tokens",
        "400",
        "--dist",
        "zipf:1.0",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "s"),
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(moesim("trace", "stats", str(tmp_path / "s"), "--json").stdout)
    assert stats["num_experts"] == 16 and stats["top_k"] == 2 and len(stats["layers"]) == 3
    assert all(len(la["expert_counts"]) == 16 for la in stats["layers"])
    assert all(la["expert_balance"] > 1 for la in stats["layers"])


def test_cli_unknown_format_and_missing_file(tmp_path):
    one_line_error(
        moesim("trace", "import", "--format", "csv", "x", "--out", str(tmp_path / "t")),
        "format",
        "csv",
        "flame-jsonl",
    )
    one_line_error(
        moesim(
            "trace",
            "import",
            "--format",
            "flame-jsonl",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "t"),
        ),
        "nope",
        "not found",
    )
    assert not (tmp_path / "t").exists()


def test_cli_truncated_parquet(tmp_path):
    synth_to_store(tmp_path / "t", num_experts=8, top_k=2, num_layers=2, num_tokens=2000)
    part = tmp_path / "t" / "layer=1" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    one_line_error(moesim("trace", "stats", str(tmp_path / "t")), "layer=1", "Parquet")


def test_cli_wrong_list_length(tmp_path):
    synth_to_store(tmp_path / "t", num_experts=8, top_k=2, num_layers=1, num_tokens=10)
    part = tmp_path / "t" / "layer=0" / "part-0.parquet"
    table = pq.read_table(part)
    meta = table.schema.metadata | {b"moesim.top_k": b"3"}
    pq.write_table(table.replace_schema_metadata(meta), part)
    one_line_error(moesim("trace", "stats", str(tmp_path / "t")), "expert_ids", "top_k 3")


def test_cli_missing_required_option():
    one_line_error(moesim("trace", "synth", "--experts", "4"), "Missing option")


def test_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    from moesim.fileio import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        synth_to_store(tmp_path / "t", num_experts=4, top_k=1, num_layers=1, num_tokens=5)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o755


def test_atomic_write_to_a_folder_or_under_a_file_is_an_input_error(tmp_path):
    """``--out`` naming a folder (or a path under a file) is a one-line input error, and
    nothing is left behind."""
    from moesim.errors import InputError
    from moesim.fileio import atomic_write_text

    with pytest.raises(InputError, match="is a folder") as err:
        atomic_write_text(tmp_path, "x")
    assert err.value.file == str(tmp_path)
    (tmp_path / "f").write_text("keep")
    with pytest.raises(InputError, match="its folder is a file"):
        atomic_write_text(tmp_path / "f" / "a.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert (tmp_path / "f").read_text() == "keep"


def test_atomic_write_where_the_system_refuses_is_an_input_error(tmp_path, monkeypatch):
    import tempfile

    from moesim.errors import InputError
    from moesim.fileio import atomic_write_text

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match="cannot write there"):
        atomic_write_text(tmp_path / "a.txt", "x")
