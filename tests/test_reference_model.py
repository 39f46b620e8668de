"""The reference torch MoE: losses and routers against hand computations on tiny tensors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moesim.errors import InputError
from moesim.model.reference import (
    MoE,
    MoEConfig,
    MoELM,
    Router,
    apply_capacity,
    device_balance_loss,
    expert_load,
    group_limited_scores,
    route,
    router_z_loss,
    switch_aux_loss,
)

TINY = MoEConfig(
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_experts=4,
    top_k=2,
    expert_d_ff=8,
    dense_d_ff=32,
    max_seq_len=16,
)


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def ids(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


# ----- losses ---------------------------------------------------------------------------------


def test_switch_aux_loss_by_hand():
    probs = t([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])  # P = [0.6, 0.4]
    chosen = ids([[0], [0], [0], [1]])  # f = [0.75, 0.25]
    # E * sum f_i P_i = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert switch_aux_loss(probs, chosen, 2).item() == pytest.approx(1.1)
    assert switch_aux_loss(probs, chosen, 2, alpha=0.01).item() == pytest.approx(0.011)
    # -1 (no expert) is not an assignment
    assert switch_aux_loss(probs, ids([[0, -1], [0, -1], [0, -1], [1, -1]]), 2).item() == (
        pytest.approx(1.1)
    )
    # uniform routing and uniform probabilities: exactly 1
    uniform = torch.full((4, 4), 0.25)
    assert switch_aux_loss(uniform, ids([[0, 1], [2, 3], [0, 1], [2, 3]]), 4).item() == 1.0


def test_router_z_loss_by_hand():
    logits = t([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: ln 2 and ln 4 = 2 ln 2
    expected = (math.log(2) ** 2 + (2 * math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_device_balance_loss_by_hand():
    # DeepSeek-V2 eq. 13-16, E = 4 experts on D = 2 devices ({0, 1}, {2, 3}), K = 2, T = 2
    probs = t([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])  # P_j = [0.45, 0.2, 0.25, 0.1]
    chosen = ids([[0, 1], [0, 2]])  # counts [2, 1, 1, 0] -> f_j = E/(K T) count = [2, 1, 1, 0]
    # f'_d = mean f over the device = [1.5, 0.5]; P'_d = sum P = [0.65, 0.35]
    # L = 1.5 * 0.65 + 0.5 * 0.35 = 1.15
    assert device_balance_loss(probs, chosen, 4, 2).item() == pytest.approx(1.15)
    assert device_balance_loss(probs, chosen, 4, 2, alpha=0.05).item() == pytest.approx(0.0575)
    uniform = torch.full((2, 4), 0.25)
    assert device_balance_loss(uniform, ids([[0, 2], [1, 3]]), 4, 2).item() == pytest.approx(1.0)


def test_model_losses_are_the_layer_means_and_weighted_into_the_objective():
    cfg = replace(TINY, aux_loss_coef=0.01, z_loss_coef=0.001, device_loss_coef=0.05, n_devices=2)
    torch.manual_seed(0)
    model = MoELM(cfg)
    idx = torch.randint(0, 256, (2, 8))
    out = model(idx, idx)
    per_layer = [
        switch_aux_loss(F.softmax(r.router_logits, -1), r.expert_ids, 4) for r in out.routing
    ]
    assert out.losses["aux"].item() == pytest.approx(sum(p.item() for p in per_layer) / 2)
    z = sum(router_z_loss(r.router_logits).item() for r in out.routing) / 2
    assert out.losses["z"].item() == pytest.approx(z)
    expected = (
        out.losses["lm"] + 0.01 * out.losses["aux"] + 0.001 * out.losses["z"]
    ) + 0.05 * out.losses["device"]
    assert out.losses["loss"].item() == pytest.approx(expected.item())


# ----- routers ----------------------------------------------------------------------------------


def test_softmax_topk_with_and_without_renormalisation():
    logits = t([[0.0, 3.0, 1.0, 2.0]])
    p = torch.softmax(logits, -1)[0]
    r = route(logits, TINY)
    assert r.expert_ids.tolist() == [[1, 3]]  # by descending gate weight
    s = p[1] + p[3]
    assert r.gate_weights[0].tolist() == pytest.approx([(p[1] / s).item(), (p[3] / s).item()])
    r = route(logits, replace(TINY, renormalize=False))
    assert r.expert_ids.tolist() == [[1, 3]]
    assert r.gate_weights[0].tolist() == pytest.approx([p[1].item(), p[3].item()])
    assert r.probs.sum().item() == pytest.approx(1.0)
    assert torch.equal(r.dispatched_ids, r.expert_ids)  # no capacity limit


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    cfg = replace(TINY, router="expert_choice", n_experts=3, top_k=1, capacity_factor=1.0)
    # C = ceil(1.0 * 3 tokens * 1 / 3 experts) = 1
    logits = t([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, -2.0, 2.0]])
    p = torch.softmax(logits, -1)
    r = route(logits, cfg)
    # experts 0 and 1 both take token 0, expert 2 takes token 2, token 1 gets none
    assert r.expert_ids.tolist() == [[0, 1, -1], [-1, -1, -1], [2, -1, -1]]
    assert r.gate_weights[0, :2].tolist() == pytest.approx([p[0, 0].item(), p[0, 1].item()])
    assert r.gate_weights[1].tolist() == [0.0, 0.0, 0.0]
    assert r.gate_weights[2, 0].item() == pytest.approx(p[2, 2].item())
    # larger case: every expert holds exactly C tokens, its top-C by probability
    torch.manual_seed(0)
    logits = torch.randn(32, 4)
    r = route(logits, replace(cfg, n_experts=4, top_k=2, capacity_factor=1.0))
    load = expert_load(r.expert_ids, 4)
    assert load.tolist() == [16.0, 16.0, 16.0, 16.0]  # C = 32 * 2 / 4
    probs = torch.softmax(logits, -1)
    for e in range(4):
        taken = set(torch.nonzero((r.expert_ids == e).any(1)).flatten().tolist())
        assert taken == set(probs[:, e].topk(16).indices.tolist())


def test_sigmoid_bias_steers_the_choice_but_not_the_weights():
    cfg = replace(TINY, router="sigmoid_bias")
    logits = t([[0.0, 1.0, 2.0, 3.0]])
    s = torch.sigmoid(logits)[0]
    assert route(logits, cfg).expert_ids.tolist() == [[3, 2]]  # no bias: top sigmoid scores
    r = route(logits, cfg, expert_bias=t([0.0, 0.0, 5.0, -5.0]))
    assert r.expert_ids.tolist() == [[2, 1]]
    total = s[2] + s[1]  # weights from the scores alone, bias not included
    expected = [(s[2] / total).item(), (s[1] / total).item()]
    assert r.gate_weights[0].tolist() == pytest.approx(expected)
    assert r.probs[0].tolist() == pytest.approx((s / s.sum()).tolist())


def test_group_limited_routing_scores_groups_by_their_top_two():
    cfg = replace(TINY, n_experts=8, n_groups=4, topk_groups=2)
    # group 0 holds the single best expert but group sums (top-2) prefer groups 1 and 2
    logits = t([[4.0, -5.0, 3.6, 3.6, 3.5, 3.5, 0.0, 0.0]])
    ungrouped = route(logits, replace(cfg, n_groups=1, topk_groups=1))
    assert set(ungrouped.expert_ids[0].tolist()) == {0, 2}
    r = route(logits, cfg)
    assert set(r.expert_ids[0].tolist()) == {2, 3}
    masked = group_limited_scores(torch.softmax(logits, -1), 4, 2)
    assert torch.isinf(masked[0, [0, 1, 6, 7]]).all()
    assert torch.isfinite(masked[0, 2:6]).all()
    # many tokens: every token's experts lie in at most topk_groups groups
    torch.manual_seed(0)
    cfg = replace(cfg, top_k=3, topk_groups=2)
    chosen = route(torch.randn(256, 8) * 3, cfg).expert_ids // 2  # (N, k) group of each
    assert max(len(set(row)) for row in chosen.tolist()) == 2


def test_noisy_topk_is_noise_free_in_eval_and_noisy_in_training():
    cfg = replace(TINY, router="noisy_topk")
    torch.manual_seed(0)
    router = Router(cfg)
    with torch.no_grad():
        router.noise_weight.normal_(0.0, 1.0)  # large noise std
    x = torch.randn(64, cfg.d_model)
    router.eval()
    a, b = router(x), router(x)
    clean = route(x @ router.weight.t(), replace(cfg, router="softmax_topk"))
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.equal(a.expert_ids, clean.expert_ids)
    assert torch.allclose(a.gate_weights, clean.gate_weights)
    router.train()
    noisy = router(x)
    assert not torch.equal(noisy.expert_ids, clean.expert_ids)
    assert torch.equal(noisy.logits, a.logits)  # logits are recorded before the noise


# ----- capacity ---------------------------------------------------------------------------------


def test_capacity_drop_first_choices_first():
    chosen = ids([[0, 1], [0, 1], [1, 0]])
    ranking = ids([[0, 1], [0, 1], [1, 0]])
    # capacity 2: first choices t0->0, t1->0, t2->1; second choices: t0->1 fits, t1->1 and
    # t2->0 overflow
    out = apply_capacity(chosen, ranking, 2, "drop")
    assert out.tolist() == [[0, 1], [0, -1], [1, -1]]


def test_capacity_reroute_to_next_best_with_room():
    chosen = ids([[0], [0], [0], [0]])
    ranking = ids([[0, 1, 2], [0, 1, 2], [0, 2, 1], [0, 1, 2]])
    # capacity 1: t0 keeps 0; t1 -> its next best 1; t2 -> its next best 2;
    # t3: 1 and 2 full -> dropped
    assert apply_capacity(chosen, ranking, 1, "reroute").tolist() == [[0], [1], [2], [-1]]
    assert apply_capacity(chosen, ranking, 1, "drop").tolist() == [[0], [-1], [-1], [-1]]
    # same round: two overflowing tokens want expert 1 with room for one, token order wins
    ranking = ids([[0, 1, 2]] * 4)
    assert apply_capacity(chosen, ranking, 1, "reroute").tolist() == [[0], [1], [2], [-1]]
    # experts outside the token's allowed groups (-1 in ranking) are never used
    ranking = ids([[0, 1, -1]] * 4)
    assert apply_capacity(chosen, ranking, 1, "reroute").tolist() == [[0], [1], [-1], [-1]]


def test_route_with_capacity_weights_a_rerouted_slot_by_its_new_expert():
    cfg = replace(TINY, n_experts=3, top_k=1, capacity_factor=1.0, overflow="reroute")
    logits = t([[3.0, 2.0, 0.0], [3.0, 0.0, 1.0], [3.0, 1.0, 0.0]])  # capacity ceil(1) = 1
    p = torch.softmax(logits, -1)
    r = route(logits, cfg)
    assert r.expert_ids.tolist() == [[0], [0], [0]]
    assert r.dispatched_ids.tolist() == [[0], [2], [1]]
    # renormalised over the original top-1: weight = p[new] / p[chosen]
    assert r.dispatched_weights[1, 0].item() == pytest.approx((p[1, 2] / p[1, 0]).item())
    r = route(logits, replace(cfg, overflow="drop"))
    assert r.dispatched_ids.tolist() == [[0], [-1], [-1]]
    assert r.dispatched_weights[1:].tolist() == [[0.0], [0.0]]


# ----- the model ------------------------------------------------------------------------------


def test_forward_returns_logits_losses_and_one_record_per_moe_layer():
    cfg = replace(TINY, n_layers=4, moe_every=2, n_shared_experts=1)
    torch.manual_seed(0)
    model = MoELM(cfg)
    idx = torch.randint(0, 256, (3, 10))
    out = model(idx, idx)
    assert out.logits.shape == (3, 10, 256)
    assert set(out.losses) == {"aux", "z", "device", "lm", "loss"}
    assert [r.layer for r in out.routing] == [1, 3]
    for r in out.routing:
        assert r.expert_ids.shape == (30, 2)
        assert r.expert_ids.dtype == torch.long
        assert not r.gate_weights.requires_grad
        assert (r.gate_weights[:, 0] >= r.gate_weights[:, 1]).all()
        assert torch.allclose(r.gate_weights.sum(1), torch.ones(30))
        assert r.router_logits.shape == (30, 4)
    assert "lm" not in model(idx).losses


def test_moe_layer_matches_a_per_token_computation():
    cfg = replace(TINY, n_shared_experts=1, capacity_factor=0.5)  # some slots dropped
    torch.manual_seed(0)
    moe = MoE(cfg, layer=0)
    x = torch.randn(2, 5, cfg.d_model)
    y, _, rec = moe(x)
    flat = x.reshape(10, -1)
    r = moe.router(flat)
    assert (rec.dispatched_ids < 0).any()
    expected = moe.shared(flat)
    for i in range(10):  # the slow way: token by token
        for slot in range(2):
            e = int(r.dispatched_ids[i, slot])
            if e >= 0:
                h = F.silu(flat[i] @ moe.w1[e]) * (flat[i] @ moe.w3[e])
                expected[i] += r.dispatched_weights[i, slot] * (h @ moe.w2[e])
    assert torch.allclose(y.reshape(10, -1), expected, atol=1e-6)


def test_router_math_is_float32_when_the_model_runs_in_bf16():
    torch.manual_seed(0)
    model = MoELM(replace(TINY, router="sigmoid_bias")).to(torch.bfloat16)
    out = model(torch.randint(0, 256, (2, 8)))
    assert out.logits.dtype == torch.bfloat16
    for r in out.routing:
        assert r.router_logits.dtype == torch.float32
        assert r.gate_weights.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    router = model.blocks[0].ffn.router
    x = torch.randn(8, TINY.d_model, dtype=torch.bfloat16)
    r = router(x)
    assert torch.equal(r.logits, F.linear(x.float(), router.weight.float()))
    assert r.probs.dtype == torch.float32


def test_loss_free_bias_moves_against_the_load():
    cfg = replace(TINY, router="sigmoid_bias", bias_update_rate=0.01)
    model = MoELM(cfg)
    out = model(torch.randint(0, 256, (2, 8)))
    rec = out.routing[0]
    # fabricate a known load: expert 0 chosen 3 times, 1 once, 2 twice, 3 twice (mean 2)
    rec = replace(rec, expert_ids=ids([[0, 1], [0, 2], [0, 3], [2, 3]]))
    model.update_expert_bias([rec])
    bias = model.blocks[0].ffn.router.expert_bias
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    with pytest.raises(InputError, match="router"):
        MoELM(TINY).update_expert_bias(out.routing)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("router", "top1"),
        ("overflow", "spill"),
        ("top_k", 9),
        ("n_heads", 3),
        ("n_groups", 3),
        ("n_experts", 0),
        ("capacity_factor", -1.0),
        ("n_devices", 3),
    ],
)
def test_bad_config_is_one_line_naming_field_and_value(field, value):
    with pytest.raises(InputError) as err:
        replace(TINY, **{field: value})
    text = str(err.value)
    assert f"field '{field}'" in text
    assert repr(value) in text
    assert "\n" not in text
