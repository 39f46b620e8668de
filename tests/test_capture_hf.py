"""Routing capture from transformers MoE models: what is recorded is what the router chose.

Every family is built tiny from its config class and randomly initialised (fixed seed).
The expected routing is computed independently here, in numpy float64: the hidden
states entering each MoE block are taken from the output of the layer's
``post_attention_layernorm`` (a hook of the test's own), the router weight matrix is
applied, and the family's selection rule is re-implemented below.

The module also runs against transformers 4.57 (v4 layout: ``block_sparse_moe.gate`` /
``mlp.gate`` are ``nn.Linear``); with transformers 5 installed, hand-built module trees
that mimic the v4 layout prove the recompute-from-logits path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
nn = torch.nn

from moesim.errors import InputError  # noqa: E402
from moesim.model.capture import (  # noqa: E402
    RoutingRule,
    capture_hf,
    find_routers,
    routing_rule,
    select_experts,
)
from moesim.traces.store import read_trace  # noqa: E402

VOCAB, HIDDEN, EXPERTS, TOP_K = 64, 32, 8, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    experts_implementation="eager",  # v5's CPU grouped_mm is slow on tiny shapes
)
DEEPSEEK = dict(
    n_routed_experts=EXPERTS,
    n_shared_experts=1,
    moe_intermediate_size=16,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    num_hidden_layers=3,
    num_key_value_heads=4,  # transformers 4.57's MLA attention wants no GQA
)


def _mixtral() -> Any:
    cfg = transformers.MixtralConfig(
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=2, **COMMON
    )
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe() -> Any:
    cfg = transformers.Qwen2MoeConfig(
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        norm_topk_prob=False,
        num_hidden_layers=3,
        mlp_only_layers=[1],  # layers 0 and 2 are MoE
        **COMMON,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _qwen3_moe() -> Any:
    cfg = transformers.Qwen3MoeConfig(
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        head_dim=8,
        num_hidden_layers=2,
        **COMMON,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _olmoe() -> Any:
    cfg = transformers.OlmoeConfig(
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=2, **COMMON
    )
    return transformers.OlmoeForCausalLM(cfg)


def _deepseek_v3() -> Any:
    cfg = transformers.DeepseekV3Config(
        num_experts_per_tok=TOP_K, norm_topk_prob=True, **DEEPSEEK, **_no_layers(COMMON)
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


def _deepseek_v2() -> Any:
    cfg = transformers.DeepseekV2Config(
        num_experts_per_tok=TOP_K,
        topk_method="group_limited_greedy",
        **DEEPSEEK,
        **_no_layers(COMMON),
    )
    return transformers.DeepseekV2ForCausalLM(cfg)


def _no_layers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in DEEPSEEK}


FAMILIES: dict[str, tuple[Callable[[], Any], list[int]]] = {
    # family: (builder, MoE layer indices)
    "mixtral": (_mixtral, [0, 1]),
    "qwen2_moe": (_qwen2_moe, [0, 2]),
    "qwen3_moe": (_qwen3_moe, [0, 1]),
    "olmoe": (_olmoe, [0, 1]),
    "deepseek_v3": (_deepseek_v3, [1, 2]),
    "deepseek_v2": (_deepseek_v2, [1, 2]),
}


def _moe_block(layer: Any) -> Any:
    block = getattr(layer, "block_sparse_moe", None)
    return block if block is not None else layer.mlp


def build(family: str, seed: int = 0) -> Any:
    """A tiny model with well-separated router scores (and a DeepSeek-V3 bias that matters)."""
    torch.manual_seed(seed)
    model = FAMILIES[family][0]().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(_moe_block(layer), "gate", None)
            if gate is not None:
                gate.weight.normal_(0.0, 1.0)
                if hasattr(gate, "e_score_correction_bias"):
                    # non-negative, so v4.57's masked_fill(0.0) and v5's -inf agree
                    gate.e_score_correction_bias.uniform_(0.0, 0.4)
    return model


def input_ids(batch: int = 2, tokens: int = 12, seed: int = 1) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, tokens), generator=g)


# ----- independent expectation (numpy float64) -------------------------------------------


def moe_inputs(model: Any, ids: Any) -> dict[int, np.ndarray]:
    """(N, H) hidden states entering each layer's MLP block, by our own hooks."""
    seen: dict[int, np.ndarray] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def hook(_m: Any, _a: Any, out: Any, i: int = i) -> None:
            seen[i] = out.detach().double().reshape(-1, out.shape[-1]).numpy()

        handles.append(layer.post_attention_layernorm.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _group_mask(choice: np.ndarray, n_group: int, topk_group: int, top2: bool) -> np.ndarray:
    n, e = choice.shape
    grouped = np.sort(choice.reshape(n, n_group, e // n_group), axis=2)[:, :, ::-1]
    score = grouped[:, :, :2].sum(axis=2) if top2 else grouped[:, :, 0]  # (N, G)
    best = np.argsort(-score, axis=1, kind="stable")[:, :topk_group]
    keep = np.zeros((n, n_group), dtype=bool)
    np.put_along_axis(keep, best, True, axis=1)
    return np.repeat(keep, e // n_group, axis=1)  # (N, E)


def expected_routing(family: str, gate: Any, h: np.ndarray, cfg: Any) -> tuple[Any, Any]:
    """(N, K) expert ids by descending weight and (N, K) weights, from first principles."""
    logits = h @ gate.weight.detach().double().numpy().T  # (N, E)
    k = cfg.num_experts_per_tok
    if family == "deepseek_v3":
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + gate.e_score_correction_bias.detach().double().numpy()
        choice = np.where(_group_mask(choice, cfg.n_group, cfg.topk_group, True), choice, -np.inf)
        norm, scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
    elif family == "deepseek_v2":
        scores = _softmax(logits)
        choice = np.where(_group_mask(scores, cfg.n_group, cfg.topk_group, False), scores, 0.0)
        norm, scale = False, cfg.routed_scaling_factor
    else:
        scores = choice = _softmax(logits)
        norm, scale = (True if family == "mixtral" else cfg.norm_topk_prob), 1.0
    ids = np.argsort(-choice, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(scores, ids, axis=1)
    if norm:
        w = w / w.sum(axis=1, keepdims=True)
    w = w * scale
    order = np.argsort(-w, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(w, order, axis=1)


def hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----- HF families ------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_matches_independent_routing(family: str, tmp_path: Path) -> None:
    model = build(family)
    ids = input_ids()
    trace = capture_hf(model, ids, tmp_path / "t", step=3)
    back = read_trace(tmp_path / "t")

    moe_layers = FAMILIES[family][1]
    assert list(back.layers) == moe_layers == list(trace.layers)
    assert [i for i, _ in find_routers(model)] == moe_layers
    assert back.num_experts == EXPERTS and back.top_k == TOP_K
    assert back.num_tokens == ids.numel()
    assert (back.steps == 3).all()
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)

    hidden = moe_inputs(model, ids)
    for li, layer in enumerate(moe_layers):
        gate = _moe_block(model.model.layers[layer]).gate
        want_ids, want_w = expected_routing(family, gate, hidden[layer], model.config)
        np.testing.assert_array_equal(back.expert_ids[li], want_ids, err_msg=f"layer {layer}")
        np.testing.assert_allclose(back.gate_weights[li], want_w, rtol=1e-5, atol=1e-6)
        assert (np.diff(back.gate_weights[li], axis=1) <= 0).all()  # descending weight

    meta = back.meta
    # v4 Mixtral/Qwen/OLMoE: the gate is an nn.Linear, so the rule was recomputed from logits
    linear = isinstance(_moe_block(model.model.layers[moe_layers[0]]).gate, nn.Linear)
    assert meta["capture"]["routing_from"] == ("gate-logits" if linear else "router-output")
    assert meta["source"] == "hf-capture"
    assert meta["layers"] == moe_layers
    assert meta["capture"]["family"] == family
    assert meta["capture"]["transformers"] == transformers.__version__
    assert meta["capture"]["batch"] == 2 and meta["capture"]["seq_len"] == 12
    assert hook_count(model) == 0


def test_deepseek_v3_bias_selects_but_does_not_weigh(tmp_path: Path) -> None:
    """The correction bias changes which experts are chosen, never their weights."""
    model = build("deepseek_v3")
    ids = input_ids(batch=4, tokens=16)
    biased = capture_hf(model, ids, tmp_path / "a")
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    plain = capture_hf(model, ids, tmp_path / "b")
    changed = (biased.expert_ids != plain.expert_ids).any(axis=2)  # (L, N)
    assert changed.any()
    # first MoE layer (same inputs in both runs): where the choice did not change, the
    # weights are identical, so the bias is not in them
    same = ~changed[0]
    assert same.any()
    np.testing.assert_allclose(biased.gate_weights[0][same], plain.gate_weights[0][same], rtol=1e-6)
    # normalised top-k times routed_scaling_factor
    np.testing.assert_allclose(biased.gate_weights.sum(axis=2), 2.5, rtol=1e-5)


def test_weight_sums_follow_norm_topk_prob(tmp_path: Path) -> None:
    sums = {}
    for family in ("mixtral", "qwen3_moe", "olmoe"):
        trace = capture_hf(build(family), input_ids(), tmp_path / family)
        sums[family] = trace.gate_weights.sum(axis=2)
    np.testing.assert_allclose(sums["mixtral"], 1.0, rtol=1e-5)  # always renormalised
    np.testing.assert_allclose(sums["qwen3_moe"], 1.0, rtol=1e-5)  # norm_topk_prob=True
    assert sums["olmoe"].mean() < 0.99  # norm_topk_prob=False: raw softmax mass of the top-k


def test_hooks_removed_and_modes_restored_after_error(tmp_path: Path) -> None:
    model = build("mixtral")
    model.train()
    model.model.layers[0].self_attn.eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}

    def boom(*_: Any) -> None:
        raise RuntimeError("boom")

    handle = model.model.layers[-1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        capture_hf(model, input_ids(), tmp_path / "t")
    handle.remove()
    assert hook_count(model) == 0
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not (tmp_path / "t").exists()

    capture_hf(model, input_ids(), tmp_path / "t")  # and a normal run leaves none either
    assert hook_count(model) == 0
    assert {name: m.training for name, m in model.named_modules()} == before


def test_capture_runs_in_eval_mode(tmp_path: Path) -> None:
    """Router jitter and dropout are off: a model left in train mode routes as in eval."""
    model = build("mixtral")
    model.config.router_jitter_noise = 0.5
    for layer in model.model.layers:
        _moe_block(layer).jitter_noise = 0.5
    evaluated = capture_hf(model, input_ids(), tmp_path / "a")
    model.train()
    trained = capture_hf(model, input_ids(), tmp_path / "b")
    np.testing.assert_array_equal(evaluated.expert_ids, trained.expert_ids)


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        (np.zeros(5, dtype=np.int64), "input_ids"),  # 1-D
        (np.full((1, 4), VOCAB), "input_ids"),  # out of vocabulary
        (np.full((1, 4), -1), "input_ids"),
        (np.ones((1, 4), dtype=np.float32), "input_ids"),
    ],
)
def test_bad_input_ids(ids: np.ndarray, field: str, tmp_path: Path) -> None:
    model = build("olmoe")
    with pytest.raises(InputError, match=field):
        capture_hf(model, ids, tmp_path / "t")
    assert hook_count(model) == 0


def test_unsupported_family_is_input_error(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(num_hidden_layers=1, **COMMON)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(InputError, match=r"model_type.*llama"):
        capture_hf(model, input_ids(), tmp_path / "t")


def test_meta_and_numpy_input(tmp_path: Path) -> None:
    trace = capture_hf(
        build("qwen3_moe"),
        input_ids().numpy(),
        tmp_path / "t",
        meta={"model": "tiny-qwen3", "corpus": "unit"},
    )
    back = read_trace(tmp_path / "t")
    assert back.meta["model"] == trace.meta["model"] == "tiny-qwen3"
    assert back.meta["capture"]["corpus"] == "unit"
    assert back.meta["capture"]["routing_from"] in ("router-output", "gate-logits")


def test_select_experts_matches_hf_deepseek_v3_router() -> None:
    """The recompute-from-logits rule agrees with transformers' own DeepSeek-V3 router."""
    model = build("deepseek_v3")
    gate = model.model.layers[1].mlp.gate
    h = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(5))
    out = gate(h)
    ref_ids, ref_w = out if len(out) == 2 else (out[2], out[1])  # v4: (idx, w); v5: (l, w, idx)
    logits = h.float() @ gate.weight.float().T
    ids, w = select_experts(logits, routing_rule(model.config), gate.e_score_correction_bias)
    order = torch.sort(ref_w, dim=-1, descending=True, stable=True).indices
    assert torch.equal(ids, ref_ids.gather(1, order))
    torch.testing.assert_close(w, ref_w.gather(1, order))


# ----- the v4 layout: nn.Linear gate, top-k in the parent block ------------------------


class V4SparseBlock(nn.Module):
    """Mimics transformers 4.57 ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock`` routing."""

    def __init__(self, hidden: int, experts: int, top_k: int, norm: bool) -> None:
        super().__init__()
        self.top_k, self.norm = top_k, norm
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)  # stands in for the experts
        self.selected: Any = None

    def forward(self, hidden_states: Any) -> Any:
        b, t, d = hidden_states.shape
        flat = hidden_states.view(-1, d)
        router_logits = self.gate(flat)
        w = torch.nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        if self.norm:
            w /= w.sum(dim=-1, keepdim=True)
        self.selected = (sel, w.to(flat.dtype))
        return self.proj(flat).view(b, t, d), router_logits


class V4DenseMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Any) -> Any:
        return self.gate_proj(x)


class V4Layer(nn.Module):
    def __init__(self, block_name: str, block: nn.Module, hidden: int) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.block_name = block_name
        setattr(self, block_name, block)

    def forward(self, x: Any) -> Any:
        out = getattr(self, self.block_name)(self.post_attention_layernorm(x))
        return x + (out[0] if isinstance(out, tuple) else out)


class V4Inner(nn.Module):
    def __init__(self, layers: list[nn.Module], hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: Any, use_cache: bool = False) -> Any:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


class V4ForCausalLM(nn.Module):
    def __init__(self, config: Any, layers: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.model = V4Inner(layers, config.hidden_size)

    def forward(self, input_ids: Any, use_cache: bool = False) -> Any:
        return self.model(input_ids)


def v4_model(family: str) -> Any:
    torch.manual_seed(0)
    if family == "mixtral":  # layers[i].block_sparse_moe.gate, always renormalised
        cfg = transformers.MixtralConfig(
            num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=2, **COMMON
        )
        layers = [
            V4Layer("block_sparse_moe", V4SparseBlock(HIDDEN, EXPERTS, TOP_K, True), HIDDEN)
            for _ in range(2)
        ]
    else:  # qwen2_moe: layers[i].mlp.gate, norm_topk_prob=False, layer 1 dense
        cfg = transformers.Qwen2MoeConfig(
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            **COMMON,
        )
        layers = [
            V4Layer("mlp", V4SparseBlock(HIDDEN, EXPERTS, TOP_K, False), HIDDEN),
            V4Layer("mlp", V4DenseMLP(HIDDEN), HIDDEN),
            V4Layer("mlp", V4SparseBlock(HIDDEN, EXPERTS, TOP_K, False), HIDDEN),
        ]
    model = V4ForCausalLM(cfg, layers)
    for layer in model.model.layers:
        if isinstance(getattr(layer, layer.block_name), V4SparseBlock):
            nn.init.normal_(getattr(layer, layer.block_name).gate.weight, 0.0, 1.0)
    return model.eval()


@pytest.mark.parametrize(("family", "moe_layers"), [("mixtral", [0, 1]), ("qwen2_moe", [0, 2])])
def test_v4_layout_recomputes_from_gate_logits(
    family: str, moe_layers: list[int], tmp_path: Path
) -> None:
    model = v4_model(family)
    ids = input_ids()
    capture_hf(model, ids, tmp_path / "t")
    back = read_trace(tmp_path / "t")
    assert list(back.layers) == moe_layers
    assert back.meta["capture"]["routing_from"] == "gate-logits"
    assert hook_count(model) == 0

    hidden = moe_inputs(model, ids)  # also runs the blocks, which keep their own choice
    for li, layer in enumerate(moe_layers):
        block = _moe_block(model.model.layers[layer])
        # 1. what the v4 block itself chose (sorted by descending weight already)
        sel, w = block.selected
        np.testing.assert_array_equal(back.expert_ids[li], sel.numpy())
        np.testing.assert_allclose(back.gate_weights[li], w.numpy(), rtol=1e-6)
        # 2. the independent numpy recomputation
        want_ids, want_w = expected_routing(family, block.gate, hidden[layer], model.config)
        np.testing.assert_array_equal(back.expert_ids[li], want_ids)
        np.testing.assert_allclose(back.gate_weights[li], want_w, rtol=1e-5, atol=1e-6)


class V4DeepseekRouter(nn.Module):
    """Mimics transformers 4.57 ``DeepseekV3TopkRouter``: returns (indices, weights), unsorted."""

    def __init__(self, rule: RoutingRule) -> None:
        super().__init__()
        self.rule = rule
        self.weight = nn.Parameter(torch.randn(EXPERTS, HIDDEN))
        self.register_buffer("e_score_correction_bias", torch.rand(EXPERTS) * 0.4)

    def forward(self, hidden_states: Any) -> Any:
        logits = hidden_states.view(-1, HIDDEN).float() @ self.weight.T
        ids, w = select_experts(logits, self.rule, self.e_score_correction_bias)
        return ids.flip(-1), w.flip(-1)  # ascending: the capture must re-sort


class V4DeepseekMoE(nn.Module):
    def __init__(self, rule: RoutingRule) -> None:
        super().__init__()
        self.gate = V4DeepseekRouter(rule)

    def forward(self, x: Any) -> Any:
        self.gate(x)
        return x


def test_v4_tuple_router_indices_first_is_resorted(tmp_path: Path) -> None:
    cfg = transformers.DeepseekV3Config(
        num_experts_per_tok=TOP_K, norm_topk_prob=True, **DEEPSEEK, **_no_layers(COMMON)
    )
    torch.manual_seed(0)
    rule = routing_rule(cfg)
    model = V4ForCausalLM(
        cfg,
        [
            V4Layer("mlp", V4DenseMLP(HIDDEN), HIDDEN),
            V4Layer("mlp", V4DeepseekMoE(rule), HIDDEN),
            V4Layer("mlp", V4DeepseekMoE(rule), HIDDEN),
        ],
    ).eval()
    ids = input_ids()
    trace = capture_hf(model, ids, tmp_path / "t")
    assert trace.layers == (1, 2)
    assert trace.meta["capture"]["routing_from"] == "router-output"
    assert (np.diff(trace.gate_weights, axis=2) <= 0).all()
    hidden = moe_inputs(model, ids)
    for li, layer in enumerate(trace.layers):
        gate = model.model.layers[layer].mlp.gate
        want_ids, want_w = expected_routing("deepseek_v3", gate, hidden[layer], cfg)
        np.testing.assert_array_equal(trace.expert_ids[li], want_ids)
        np.testing.assert_allclose(trace.gate_weights[li], want_w, rtol=1e-5)


# ----- the command (capture_cmd), through typer ------------------------------------------


def run_cmd(*args: str) -> Any:
    import typer
    from typer.testing import CliRunner

    from moesim.model.capture_cmd import capture_cmd

    app = typer.Typer()
    app.command()(capture_cmd)
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_cmd_hf_config_default_corpus(family: str, tmp_path: Path) -> None:
    out = tmp_path / "t"
    result = run_cmd(f"hf-config:{family}", "--out", str(out), "--tokens", "96", "--seq-len", "48")
    assert result.exit_code == 0, result.output
    assert "captured 96 tokens" in result.output
    back = read_trace(out)
    assert back.num_tokens == 96 and back.num_experts == 8 and back.top_k == 2
    assert list(back.layers) == ([0, 1, 2, 3] if family == "mixtral" else [1, 2, 3])
    cap = back.meta["capture"]
    assert back.meta["model"] == f"tiny-{family}"
    assert (
        cap["corpus"].startswith("python-stdlib:") and cap["tokenization"] == "utf8-bytes-mod-256"
    )
    assert (cap["batch"], cap["seq_len"], cap["seed"]) == (2, 48, 0)


def test_cmd_is_deterministic_per_seed(tmp_path: Path) -> None:
    traces = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        result = run_cmd(
            "hf-config:olmoe", "--out", str(tmp_path / name), "--tokens", "64", "--seed", seed
        )
        assert result.exit_code == 0, result.output
        traces.append(read_trace(tmp_path / name).expert_ids)
    assert np.array_equal(traces[0], traces[1])
    assert not np.array_equal(traces[0], traces[2])


def test_cmd_text_file_and_bad_input(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)  # 176 bytes
    ok = run_cmd(
        "hf-config:qwen3_moe",
        "--out",
        str(tmp_path / "t"),
        "--text-file",
        str(text),
        "--tokens",
        "128",
    )
    assert ok.exit_code == 0, ok.output
    assert read_trace(tmp_path / "t").meta["capture"]["corpus"] == str(text)
    bad = [
        (["hf-config:qwen3_moe", "--text-file", str(text), "--tokens", "500"], "only 176 tokens"),
        (["hf-config:llama"], "unknown model family"),
        (["mixtral"], "source must be"),
        (["hf-config:mixtral", "--tokens", "100", "--seq-len", "64"], "multiple of"),
        (["hf-config:mixtral", "--tokens", "0"], "tokens"),
        (["hf:" + str(tmp_path / "nowhere")], "no config.json"),
        (["reference:" + str(tmp_path / "missing.pt")], "missing.pt"),
    ]
    for args, needle in bad:
        result = run_cmd(*args, "--out", str(tmp_path / "bad"))
        assert isinstance(result.exception, InputError), (args, result.output)
        assert needle in str(result.exception), (args, str(result.exception))
        assert len(str(result.exception).splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_cmd_hf_dir_matches_capture_hf(tmp_path: Path) -> None:
    from moesim.model.capture_cmd import _byte_ids, stdlib_text

    model = build("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    result = run_cmd(f"hf:{tmp_path / 'm'}", "--out", str(tmp_path / "a"), "--tokens", "64")
    assert result.exit_code == 0, result.output
    direct = capture_hf(model, _byte_ids(stdlib_text(), VOCAB)[:64][None], tmp_path / "b")
    back = read_trace(tmp_path / "a")
    np.testing.assert_array_equal(back.expert_ids, direct.expert_ids)
    np.testing.assert_allclose(back.gate_weights, direct.gate_weights, rtol=1e-5)


# ----- the reference MoE (moesim.model.reference) ----------------------------------------


def test_cmd_reference_checkpoint_matches_model_routing(tmp_path: Path) -> None:
    """A checkpoint of train_reference, captured by the command, as the model routes it."""
    reference = pytest.importorskip("moesim.model.reference")
    train = pytest.importorskip("moesim.model.train")
    from moesim.model.capture import capture_reference
    from moesim.model.capture_cmd import _byte_ids, stdlib_text

    cfg = reference.MoEConfig(
        max_seq_len=32, d_model=32, n_layers=3, n_heads=4, n_experts=8, top_k=2,
        expert_d_ff=16, dense_d_ff=32, router="sigmoid_bias", n_groups=2, topk_groups=1,
    )  # fmt: skip
    ckpt = tmp_path / "ref.pt"
    train.train_reference(
        cfg, steps=2, batch_size=2, seq_len=32, corpus_bytes=20_000, balance="loss_free", out=ckpt
    )
    model, _ = train.load_reference(ckpt)
    result = run_cmd(f"reference:{ckpt}", "--out", str(tmp_path / "t"), "--tokens", "64")
    assert result.exit_code == 0, result.output
    back = read_trace(tmp_path / "t")
    assert back.meta["source"] == "reference-capture"
    assert back.meta["capture"]["seq_len"] == 32  # max_seq_len: 2 sequences
    assert back.meta["capture"]["checkpoint"]["balance"] == "loss_free"
    assert list(back.layers) == [0, 1, 2]

    ids = torch.as_tensor(_byte_ids(stdlib_text(), 256)[:64].reshape(2, 32))
    with torch.no_grad():
        records = model(ids).routing
    for li, rec in enumerate(records):
        np.testing.assert_array_equal(back.expert_ids[li], rec.expert_ids.numpy())
        np.testing.assert_allclose(back.gate_weights[li], rec.gate_weights.numpy(), rtol=1e-6)
    direct = capture_reference(model, ids, tmp_path / "d")
    np.testing.assert_array_equal(direct.expert_ids, back.expert_ids)


def test_reference_expert_choice_is_rejected(tmp_path: Path) -> None:
    from moesim.model.capture import capture_reference

    reference = pytest.importorskip("moesim.model.reference")
    cfg = reference.MoEConfig(
        max_seq_len=16, d_model=32, n_layers=1, n_heads=4, n_experts=8, top_k=2,
        expert_d_ff=16, router="expert_choice",
    )  # fmt: skip
    with pytest.raises(InputError, match="fixed top-k"):
        capture_reference(reference.MoELM(cfg), input_ids(1, 8), tmp_path / "t")


def test_cmd_reference_unavailable_is_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "moesim.model.train", None)  # import now fails
    result = run_cmd(f"reference:{tmp_path / 'x.pt'}", "--out", str(tmp_path / "t"))
    assert isinstance(result.exception, InputError)
    assert "reference model not available" in str(result.exception)
