"""Training the reference MoE: measured balancing effects, determinism, checkpoints, CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from moesim.errors import InputError
from moesim.model.reference import MoEConfig
from moesim.model.train import (
    DEFAULT_AUX_LOSS_COEF,
    TrainResult,
    balance_config,
    load_corpus,
    load_reference,
    train_reference,
)
from tests.conftest import run_moesim as _moesim

# A tiny model and a short run: ~1 s per run on one core. Without balancing its router
# collapses (nearly every token picks the same two of 8 experts, ratio near 4); the
# effects below held with wide margins on seeds 0-7 (see each test).
SMALL = MoEConfig(
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_experts=8,
    top_k=2,
    expert_d_ff=32,
    dense_d_ff=64,
    max_seq_len=32,
)
RUN = {"steps": 60, "batch_size": 8, "seq_len": 32, "corpus_bytes": 1_000_000, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster (and steadier on a shared machine) on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def late(values: list[float]) -> float:
    """Mean over the second half of the run."""
    half = values[len(values) // 2 :]
    return sum(half) / len(half)


@pytest.fixture(scope="module")
def runs() -> dict[str, TrainResult]:
    sigmoid = replace(SMALL, router="sigmoid_bias")
    return {
        "none": train_reference(SMALL, balance="none", **RUN),
        "aux": train_reference(replace(SMALL, aux_loss_coef=0.1), balance="aux", **RUN),
        "zloss": train_reference(replace(SMALL, z_loss_coef=0.01), balance="zloss", **RUN),
        "sigmoid_none": train_reference(sigmoid, balance="none", **RUN),
        "loss_free": train_reference(
            replace(sigmoid, bias_update_rate=0.01), balance="loss_free", **RUN
        ),
    }


def test_aux_loss_lowers_the_balance_ratio(runs):
    # seeds 0-7: none 3.83-4.00, aux 1.53-1.73
    none, aux = late(runs["none"].balance_ratio), late(runs["aux"].balance_ratio)
    assert none > 3.0
    assert aux < 0.7 * none


def test_loss_free_bias_lowers_the_balance_ratio(runs):
    # seeds 0-7: sigmoid router without balancing 3.88-4.00, with the bias 1.78-2.67
    none, free = late(runs["sigmoid_none"].balance_ratio), late(runs["loss_free"].balance_ratio)
    assert none > 3.0
    assert free < 0.8 * none


def test_z_loss_lowers_the_router_logsumexp(runs):
    # seeds 0-7: mean logsumexp(logits)^2 3.99-5.94 without, 0.01-0.12 with z-loss (0.01)
    assert late(runs["zloss"].router_z) < 0.25 * late(runs["none"].router_z)


def test_per_step_figures_are_recorded(runs):
    r = runs["aux"]
    for values in (r.lm_loss, r.loss, r.balance_ratio, r.mean_sq_logit, r.router_z):
        assert len(values) == RUN["steps"]
    assert r.lm_loss[-1] < r.lm_loss[0] - 1.0  # it learns (ln 256 = 5.5 at the start)
    assert all(total > lm for total, lm in zip(r.loss, r.lm_loss, strict=True))  # aux > 0
    assert all(b >= 1.0 for b in r.balance_ratio)
    assert r.config.aux_loss_coef == 0.1
    assert runs["none"].loss == runs["none"].lm_loss
    assert r.summary()["final_lm_loss"] == pytest.approx(sum(r.lm_loss[-6:]) / 6)


def test_training_is_deterministic_for_a_seed():
    kw = RUN | {"steps": 8}
    cfg = replace(SMALL, router="noisy_topk")  # router noise comes from the seed too
    a = train_reference(cfg, balance="aux", **kw)
    b = train_reference(cfg, balance="aux", **kw)
    assert a.lm_loss == b.lm_loss
    assert a.balance_ratio == b.balance_ratio
    assert a.corpus_sha256 == b.corpus_sha256
    assert train_reference(cfg, balance="aux", **(kw | {"seed": 1})).lm_loss != a.lm_loss


def test_training_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_reference(SMALL, **(RUN | {"steps": 2}))
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_saves_atomically_and_reloads(tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    cfg = replace(SMALL, router="sigmoid_bias", n_shared_experts=1)
    result = train_reference(cfg, balance="loss_free", out=path, **(RUN | {"steps": 5}))
    assert result.checkpoint == path
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left
    model, meta = load_reference(path)
    assert meta["config"]["router"] == "sigmoid_bias"
    assert meta["balance"] == "loss_free"
    assert meta["steps"] == 5
    assert result.model is not None
    trained = result.model.state_dict()
    loaded = model.state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert any(b.abs().sum() > 0 for k, b in loaded.items() if k.endswith("expert_bias"))
    result.model.eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, result.model(idx).logits)


def test_load_reference_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint"):
        load_reference(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not a torch checkpoint"):
        load_reference(bad)


def test_corpus_is_the_stdlib_in_sorted_order():
    a, b = load_corpus(10_000), load_corpus(10_000)
    assert a.dtype == torch.uint8
    assert a.numel() == 10_000
    assert torch.equal(a, b)
    assert torch.equal(load_corpus(20_000)[:10_000], a)
    assert bytes(a[:3].tolist()) == b'"""'  # __future__.py opens with its docstring


def test_balance_config_switches_terms_on_and_off():
    cfg = balance_config(replace(SMALL, z_loss_coef=0.5), "aux")
    assert cfg.aux_loss_coef == DEFAULT_AUX_LOSS_COEF
    assert cfg.z_loss_coef == 0.0
    both = balance_config(replace(SMALL, router="sigmoid_bias"), "loss_free+zloss")
    assert both.bias_update_rate > 0
    assert both.z_loss_coef > 0
    assert both.aux_loss_coef == 0.0
    for bad in ("", "balanced", "aux+aux", "none+aux"):
        with pytest.raises(InputError, match="field 'balance'"):
            balance_config(SMALL, bad)
    with pytest.raises(InputError, match="field 'router'"):
        balance_config(SMALL, "loss_free")
    with pytest.raises(InputError, match="field 'n_devices'"):
        balance_config(SMALL, "device")
    assert balance_config(replace(SMALL, n_devices=2), "device").device_loss_coef > 0
    with pytest.raises(InputError, match="field 'steps'"):
        train_reference(SMALL, **(RUN | {"steps": 0}))


def test_cli_trains_writes_a_checkpoint_and_prints_json(tmp_path):
    out = tmp_path / "model.pt"
    args = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--experts", "4"]
    proc = _moesim("train-reference", *args, "--threads", "1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 2
    for key in ("final_lm_loss", "final_balance_ratio", "wall_time_s"):
        assert summary[key] > 0
    assert load_reference(out)[1]["config"]["n_experts"] == 4


def test_cli_bad_router_is_one_line(tmp_path):
    proc = _moesim("train-reference", "--router", "best", "--out", str(tmp_path / "m.pt"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "moesim: error: field 'router': value 'best': must be one of softmax_topk, "
        "noisy_topk, expert_choice, sigmoid_bias"
    ]
    assert not (tmp_path / "m.pt").exists()
