import numpy as np
import pytest

from moesim.errors import InputError
from moesim.traces.importers import import_flame_jsonl
from moesim.traces.store import RoutingTrace, read_trace, write_trace
from moesim.traces.synthetic import synthesize
from tests.conftest import FLAME_TRACE, REPO

SHARED_FLAME = (
    REPO.parent / "shared" / "data" / "flame_moe_290m_iter5473_prefill_L2-9_2048tok_top6.jsonl"
)


def test_bundled_flame_trace_shape_and_skew():
    t = read_trace(FLAME_TRACE)
    assert t.expert_ids.shape == (8, 2048, 6)
    assert t.layers == tuple(range(2, 10))
    assert t.num_experts == 64
    counts = np.stack([np.bincount(t.expert_ids[i].ravel(), minlength=64) for i in range(8)])
    # hottest expert / mean, per the data's README: 1.86, 1.66, 1.38, 1.43, 1.39, 1.46, 1.43, 1.59
    ratios = counts.max(axis=1) / counts.mean(axis=1)
    np.testing.assert_allclose(ratios, [1.86, 1.66, 1.38, 1.43, 1.39, 1.46, 1.43, 1.59], atol=0.006)
    # experts are distinct per token and weights sorted descending
    assert all(len(set(row)) == 6 for row in t.expert_ids[0].tolist())
    assert (np.diff(t.gate_weights, axis=2) <= 0).all()


@pytest.mark.skipif(not SHARED_FLAME.exists(), reason="shared data not present")
def test_bundled_trace_equals_fresh_import():
    fresh = import_flame_jsonl(SHARED_FLAME)
    bundled = read_trace(FLAME_TRACE)
    np.testing.assert_array_equal(fresh.expert_ids, bundled.expert_ids)
    np.testing.assert_array_equal(fresh.gate_weights, bundled.gate_weights)


def test_round_trip(tmp_path):
    t = synthesize(
        num_experts=16, top_k=2, num_layers=3, num_tokens=100, distribution="zipf", seed=3
    )
    write_trace(t, tmp_path / "t")
    r = read_trace(tmp_path / "t")
    np.testing.assert_array_equal(r.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(r.gate_weights, t.gate_weights)
    assert r.meta["num_experts"] == 16 and r.meta["top_k"] == 2
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["layer=0", "layer=1", "layer=2"]


def test_write_refuses_bad_ids_and_leaves_nothing(tmp_path):
    t = synthesize(num_experts=4, top_k=1, num_layers=1, num_tokens=10, seed=0)
    bad = RoutingTrace(
        expert_ids=t.expert_ids + 10,
        gate_weights=t.gate_weights,
        steps=t.steps,
        layers=t.layers,
        num_experts=4,
    )
    with pytest.raises(InputError, match="out of range"):
        write_trace(bad, tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_nan_gate_weight_rejected(tmp_path):
    t = synthesize(num_experts=4, top_k=1, num_layers=1, num_tokens=10, seed=0)
    w = t.gate_weights.copy()
    w[0, 3, 0] = np.nan
    with pytest.raises(InputError, match="gate_weights"):
        RoutingTrace(
            expert_ids=t.expert_ids, gate_weights=w, steps=t.steps, layers=t.layers, num_experts=4
        ).validate()


def test_synthetic_distinct_and_seeded():
    a = synthesize(
        num_experts=8, top_k=3, num_layers=2, num_tokens=500, distribution="zipf", seed=1
    )
    b = synthesize(
        num_experts=8, top_k=3, num_layers=2, num_tokens=500, distribution="zipf", seed=1
    )
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert all(len(set(r)) == 3 for r in a.expert_ids[0].tolist())
    c = np.bincount(a.expert_ids[0].ravel(), minlength=8)
    assert c.max() / c.mean() > 1.3  # zipf is skewed


def test_a_folder_that_is_not_a_trace_is_never_deleted(tmp_path):
    """Writing a trace where something else lives is refused before any work, one line,
    exit 2, and everything there is left as it was; the working folder itself too."""
    import subprocess
    import sys

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    synth = [sys.executable, "-m", "moesim", "trace", "synth", "--experts", "8", "--top-k", "2",
             "--layers", "2", "--tokens", "100", "--out"]  # fmt: skip
    for out, cwd in ((str(keep), REPO), (".", keep)):
        proc = subprocess.run([*synth, out], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert "is not a moesim trace folder" in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
        assert (keep / "notes.txt").read_text() == "precious"
    # a file in its place, or a trace folder with a stranger in it, likewise
    (tmp_path / "file").write_text("x")
    trace = synthesize(num_experts=8, top_k=2, num_layers=2, num_tokens=50)
    with pytest.raises(InputError, match="not a moesim trace folder"):
        write_trace(trace, tmp_path / "file")
    write_trace(trace, tmp_path / "tr")
    (tmp_path / "tr" / "layer=0" / "mine.txt").write_text("x")
    with pytest.raises(InputError, match="not a moesim trace folder"):
        write_trace(trace, tmp_path / "tr")
    assert (tmp_path / "tr" / "layer=0" / "mine.txt").is_file()


def test_a_trace_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    old = synthesize(num_experts=8, top_k=2, num_layers=3, num_tokens=50, seed=1)
    new = synthesize(num_experts=8, top_k=2, num_layers=2, num_tokens=40, seed=2)
    write_trace(old, tmp_path / "tr")
    write_trace(new, tmp_path / "tr")
    got = read_trace(tmp_path / "tr")
    assert got.layers == (0, 1) and got.num_tokens == 40
    np.testing.assert_array_equal(got.expert_ids, new.expert_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tr"]  # no temporaries left


def test_an_expert_twice_in_one_tokens_top_k_is_refused(tmp_path):
    ids = np.array([[[0, 1], [2, 2], [3, 1]]], dtype=np.int32)  # row 1 picks expert 2 twice
    trace = RoutingTrace(
        expert_ids=ids,
        gate_weights=np.full(ids.shape, 0.5, dtype=np.float32),
        steps=np.zeros(3, dtype=np.int32),
        layers=(0,),
        num_experts=4,
    )
    with pytest.raises(InputError, match=r"twice in one token's top-k \(layer 0, row 1\)") as e:
        write_trace(trace, tmp_path / "t")
    assert e.value.value == [2, 2] and not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("groups", "digest"),
    [
        (None, "51ccde8eebf94148b70f7d20faf89e27f0b367bdc539f354228d11b86c3e3465"),
        ((8, 4), "34a90702bde7e76cd300dbbf8b76703fbca4bee05f08dd6626c2a86e612f2e43"),
    ],
)
def test_synthetic_routing_bytes_are_pinned(groups, digest):
    """The sampler's output for a fixed seed, pinned: a faster sampler must draw the same
    ids and weights bit for bit (these digests were taken before the compiled draws, from
    the packed-key sort and np.searchsorted), and a deliberate change of the law must
    update them knowingly."""
    import hashlib

    t = synthesize(num_experts=64, top_k=6, num_layers=2, num_tokens=3000,
                   distribution="zipf:1.2", steps=2, seed=11, groups=groups)  # fmt: skip
    got = hashlib.sha256(t.expert_ids.tobytes() + t.gate_weights.tobytes()).hexdigest()
    assert got == digest
