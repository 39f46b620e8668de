"""A small reference Mixture-of-Experts language model, in one readable file.

The shape of nanoGPT's ``model.py``: a config dataclass, a few ``nn.Module`` classes and
tensor shapes in comments. A decoder-only byte-level LM with RMSNorm, causal attention
(``F.scaled_dot_product_attention``) and MoE FFN layers of SwiGLU experts (optionally
fine-grained: many small experts, plus shared experts that see every token).

Routers (``MoEConfig.router``):

- ``softmax_topk``: softmax over experts, keep the top-k (``renormalize`` the k weights or not).
- ``noisy_topk``: Shazeer et al. 2017 (arXiv 1701.06538, eq. 3-5): logits plus Gaussian
  noise whose std is ``softplus(x @ W_noise)``; noise only in training.
- ``expert_choice``: Zhou et al. 2022 (arXiv 2202.09368): each expert takes its top-C tokens.
- ``sigmoid_bias``: DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.2): sigmoid scores; a
  non-learned per-expert bias is added for the top-k *choice* only, and nudged after each
  step by ``bias += gamma * sign(mean_load - load)`` (:meth:`MoELM.update_expert_bias`).

Any top-k router can be group-limited (``n_groups``, ``topk_groups``): each token may
only use experts of its best ``topk_groups`` groups, a group scored by the sum of its two
highest scores (DeepSeek-V3 node-limited routing).

The forward pass returns a :class:`MoEOutput`: logits, a dict of losses and one
:class:`RoutingRecord` per MoE layer (the routing decisions, for trace capture).
Router math runs in float32 whatever the dtype of the rest of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesim.errors import InputError

__all__ = [
    "OVERFLOWS",
    "ROUTERS",
    "MoEConfig",
    "MoELM",
    "MoEOutput",
    "RouterOutput",
    "RoutingRecord",
    "apply_capacity",
    "device_balance_loss",
    "expert_capacity",
    "expert_load",
    "group_limited_scores",
    "route",
    "router_z_loss",
    "switch_aux_loss",
]

ROUTERS = ("softmax_topk", "noisy_topk", "expert_choice", "sigmoid_bias")
OVERFLOWS = ("drop", "reroute")


@dataclass(frozen=True)
class MoEConfig:
    """Shape, router and loss coefficients of the reference MoE; validated on creation."""

    vocab_size: int = 256  # bytes
    max_seq_len: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 16  # routed experts per MoE layer
    top_k: int = 2
    expert_d_ff: int = 128  # hidden width of one routed (or shared) expert
    n_shared_experts: int = 0  # experts every token goes through (DeepSeekMoE)
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0; others dense
    dense_d_ff: int = 512  # hidden width of the dense FFN layers
    router: str = "softmax_topk"  # one of ROUTERS
    renormalize: bool = True  # top-k weights divided by their sum
    n_groups: int = 1  # expert groups for group-limited routing (1 = off)
    topk_groups: int = 1  # groups a token may use
    capacity_factor: float | None = None  # None = unlimited (expert choice: 1.0)
    overflow: str = "drop"  # over-capacity assignments: "drop" or "reroute"
    aux_loss_coef: float = 0.0  # Switch balance loss weight (alpha)
    z_loss_coef: float = 0.0  # router z-loss weight
    device_loss_coef: float = 0.0  # DeepSeek-V2 device-level balance loss weight
    n_devices: int = 1  # devices the experts are split over (contiguously) for that loss
    bias_update_rate: float = 0.0  # gamma of loss-free balancing (sigmoid_bias)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InputError:
            return InputError(why, field=name, value=getattr(self, name))

        for f in fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name == "n_shared_experts" else 1
            if isinstance(value, int) and not isinstance(value, bool) and value < least:
                raise bad(f.name, f"must be an integer >= {least}")
            if isinstance(value, float) and not value >= 0.0:
                raise bad(f.name, "must be a number >= 0")
        if self.router not in ROUTERS:
            raise bad("router", f"must be one of {', '.join(ROUTERS)}")
        if self.overflow not in OVERFLOWS:
            raise bad("overflow", f"must be one of {', '.join(OVERFLOWS)}")
        if self.d_model % self.n_heads:
            raise bad("n_heads", f"must divide d_model ({self.d_model})")
        if self.top_k > self.n_experts:
            raise bad("top_k", f"must be at most n_experts ({self.n_experts})")
        if self.n_experts % self.n_groups:
            raise bad("n_groups", f"must divide n_experts ({self.n_experts})")
        if self.topk_groups > self.n_groups:
            raise bad("topk_groups", f"must be at most n_groups ({self.n_groups})")
        if self.topk_groups * (self.n_experts // self.n_groups) < self.top_k:
            raise bad("topk_groups", f"leaves fewer than top_k ({self.top_k}) experts")
        if self.router == "expert_choice" and self.n_groups > 1:
            raise bad("n_groups", "group-limited routing needs a top-k router")
        if self.n_experts % self.n_devices:
            raise bad("n_devices", f"must divide n_experts ({self.n_experts})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise bad("capacity_factor", "must be > 0 or None")


# ----- losses: pure functions of router outputs ---------------------------------------------


def expert_load(expert_ids: Tensor, n_experts: int) -> Tensor:
    """(E,) float32 assignments per expert; ``expert_ids`` (N, W) with -1 for none."""
    ids = expert_ids[expert_ids >= 0]
    return torch.bincount(ids, minlength=n_experts).float()


def switch_aux_loss(
    probs: Tensor, expert_ids: Tensor, n_experts: int, alpha: float = 1.0
) -> Tensor:
    """Switch Transformer balance loss ``alpha * E * sum_i f_i * P_i`` (arXiv 2101.03961, eq. 4).

    ``f_i``: fraction of the assignments (N * k for top-k) that went to expert i (no
    gradient); ``P_i``: mean router probability of expert i. 1.0 (times alpha) when uniform.
    Args: probs (N, E) router probabilities; expert_ids (N, W), -1 for none.
    """
    load = expert_load(expert_ids, n_experts)  # (E,)
    f = load / load.sum().clamp_min(1.0)  # (E,)
    p = probs.float().mean(0)  # (E,)
    return alpha * n_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2`` (arXiv 2202.08906, eq. 5).

    Args: logits (N, E).
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def device_balance_loss(
    probs: Tensor, expert_ids: Tensor, n_experts: int, n_devices: int, alpha: float = 1.0
) -> Tensor:
    """DeepSeek-V2 device-level balance loss (arXiv 2405.04434, sec. 2.2.2, eq. 14-16).

    ``L = alpha * sum_{d=1..D} f'_d * P'_d`` with ``f'_d = mean_{j on d} f_j`` and
    ``P'_d = sum_{j on d} P_j``, where (eq. 13) ``f_j = E / (K * T) * count_j`` and
    ``P_j = mean_t s_{j,t}``. Experts sit contiguously: device d holds experts
    ``d*E/D .. (d+1)*E/D - 1``. 1.0 (times alpha) when uniform.
    Args: probs (N, E) router probabilities; expert_ids (N, W), -1 for none.
    """
    load = expert_load(expert_ids, n_experts)  # (E,)
    f = n_experts * load / load.sum().clamp_min(1.0)  # (E,)  K*T = all assignments
    p = probs.float().mean(0)  # (E,)
    f_dev = f.view(n_devices, -1).mean(1)  # (D,)
    p_dev = p.view(n_devices, -1).sum(1)  # (D,)
    return alpha * (f_dev * p_dev).sum()


# ----- routing: pure functions of float32 logits --------------------------------------------


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, n_experts: int) -> int:
    """GShard capacity ``ceil(capacity_factor * tokens * top_k / n_experts)``, at most tokens."""
    return min(tokens, math.ceil(capacity_factor * tokens * top_k / n_experts))


def group_limited_scores(scores: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """Mask (-inf) the experts outside each token's best ``topk_groups`` groups.

    A group is scored by the sum of its two highest expert scores (DeepSeek-V3).
    Args: scores (N, E), experts split into ``n_groups`` contiguous groups.
    """
    n, e = scores.shape
    grouped = scores.view(n, n_groups, e // n_groups)  # (N, G, E/G)
    group_score = grouped.topk(min(2, e // n_groups), dim=-1).values.sum(-1)  # (N, G)
    best = group_score.topk(topk_groups, dim=-1).indices  # (N, M)
    keep = torch.zeros(n, n_groups, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, best, True)  # (N, G)
    return scores.masked_fill(~keep.repeat_interleave(e // n_groups, dim=1), float("-inf"))


def _arrival_position(experts: Tensor, active: Tensor, n_experts: int) -> Tensor:
    """(N,) position of each active row among active rows with the same expert, in row order."""
    onehot = F.one_hot(experts.clamp_min(0), n_experts) * active[:, None]  # (N, E)
    return (onehot.cumsum(0) * onehot).sum(1) - 1  # (N,)


def apply_capacity(expert_ids: Tensor, ranking: Tensor, capacity: int, overflow: str) -> Tensor:
    """Enforce ``capacity`` assignments per expert; returns dispatched ids (N, k), -1 = dropped.

    Priority as in GShard: all first choices in token order, then all second choices, and
    so on. With ``overflow="reroute"`` an overflowing assignment moves to the token's
    next-best expert (``ranking`` column k, k+1, ...) that still has room.
    Args: expert_ids (N, k) chosen experts; ranking (N, E) every expert in the token's
    descending score order (its first k columns are the chosen ones), -1 = not allowed.
    """
    n, k = expert_ids.shape
    n_experts = ranking.shape[1]
    fill = torch.zeros(n_experts, dtype=torch.long, device=expert_ids.device)  # (E,)
    out = expert_ids.clone()  # (N, k)
    for r in range(k):  # loop over ranks, not tokens
        e = expert_ids[:, r]  # (N,)
        active = e >= 0
        keep = active & (_arrival_position(e, active, n_experts) + fill[e.clamp_min(0)] < capacity)
        out[:, r] = torch.where(keep, e, -1)
        fill += torch.bincount(e[keep], minlength=n_experts)
    if overflow == "reroute":
        pending = (out < 0) & (expert_ids >= 0)  # (N, k) overflowed assignments
        rows = torch.arange(n, device=expert_ids.device)
        for r in range(k, n_experts):  # the token's next-best experts, best first
            cand = ranking[:, r]  # (N,) never one of the token's chosen experts
            active = pending.any(1) & (cand >= 0)
            ok = active & (
                _arrival_position(cand, active, n_experts) + fill[cand.clamp_min(0)] < capacity
            )
            slot = pending.int().argmax(1)  # (N,) first pending slot of each token
            out[rows[ok], slot[ok]] = cand[ok]
            pending[rows[ok], slot[ok]] = False
            fill += torch.bincount(cand[ok], minlength=n_experts)
    return out


@dataclass
class RouterOutput:
    """What a router decided for N tokens (float32 tensors, differentiable weights).

    Attributes:
        logits: (N, E) router logits (before noise).
        probs: (N, E) normalised router scores, used by the balance losses.
        expert_ids: (N, W) chosen experts by descending gate weight, -1 = none
            (W = top_k; W = n_experts for expert choice, which picks a variable number).
        gate_weights: (N, W) their weights (0 where none).
        dispatched_ids: (N, W) experts that process each slot after capacity (-1 = dropped;
            a rerouted slot holds its new expert).
        dispatched_weights: (N, W) weights the expert outputs are combined with.
    """

    logits: Tensor
    probs: Tensor
    expert_ids: Tensor
    gate_weights: Tensor
    dispatched_ids: Tensor
    dispatched_weights: Tensor


def route(
    logits: Tensor,
    cfg: MoEConfig,
    *,
    expert_bias: Tensor | None = None,
    noise_std: Tensor | None = None,
) -> RouterOutput:
    """Route N tokens from their router logits (N, E) according to ``cfg``.

    ``expert_bias`` (E,) steers the ``sigmoid_bias`` choice; ``noise_std`` (N, E) adds
    Gaussian noise to the logits (``noisy_topk`` in training). Math in float32.
    """
    logits = logits.float()  # (N, E)
    n, e = logits.shape
    noisy = logits if noise_std is None else logits + torch.randn_like(logits) * noise_std
    if cfg.router == "expert_choice":
        probs = noisy.softmax(-1)  # (N, E)
        c = expert_capacity(cfg.capacity_factor or 1.0, n, cfg.top_k, e)
        tok = probs.t().topk(c, dim=1).indices  # (E, C) each expert's top-C tokens
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen[tok, torch.arange(e, device=logits.device)[:, None]] = True  # (N, E)
        key = torch.where(chosen, probs, -1.0)
        order = key.sort(dim=-1, descending=True, stable=True).indices  # (N, E)
        ids = torch.where(key.gather(1, order) >= 0, order, -1)  # (N, E)
        weights = torch.where(ids >= 0, probs.gather(1, ids.clamp_min(0)), 0.0)
        return RouterOutput(logits, probs, ids, weights, ids, weights)
    if cfg.router == "sigmoid_bias":
        scores = torch.sigmoid(noisy)  # (N, E) gate scores
        probs = scores / scores.sum(-1, keepdim=True)  # (N, E) for the balance losses
        select = scores if expert_bias is None else scores + expert_bias.float()  # choice only
    else:
        scores = probs = noisy.softmax(-1)  # (N, E)
        select = scores
    if cfg.n_groups > 1:
        select = group_limited_scores(select, cfg.n_groups, cfg.topk_groups)
    sel_sorted, ranking = select.detach().sort(dim=-1, descending=True, stable=True)  # (N, E)
    ranking = torch.where(torch.isinf(sel_sorted), -1, ranking)  # masked groups: not allowed
    top = ranking[:, : cfg.top_k]  # (N, k)
    top_scores = scores.gather(1, top)  # (N, k)
    norm = (
        1.0 / top_scores.sum(-1, keepdim=True)
        if cfg.renormalize
        else torch.ones_like(top_scores[:, :1])
    )  # (N, 1)
    weights, order = (top_scores * norm).sort(dim=-1, descending=True, stable=True)  # (N, k)
    ids = top.gather(1, order)  # (N, k) by descending gate weight
    dispatched = ids
    if cfg.capacity_factor is not None:
        cap = expert_capacity(cfg.capacity_factor, n, cfg.top_k, e)
        dispatched = apply_capacity(ids, ranking, cap, cfg.overflow)
    d_weights = torch.where(dispatched >= 0, scores.gather(1, dispatched.clamp_min(0)) * norm, 0.0)
    return RouterOutput(logits, probs, ids, weights, dispatched, d_weights)


# ----- modules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRecord:
    """Routing decisions of one MoE layer for one forward pass (detached tensors).

    Attributes:
        layer: model layer index (0-based) of the MoE layer.
        expert_ids: (B*T, W) int64 chosen experts by descending gate weight, -1 = none.
        gate_weights: (B*T, W) float32 router weights, same order.
        dispatched_ids: (B*T, W) int64 experts that processed each slot after capacity
            (-1 = dropped).
        router_logits: (B*T, E) float32.
    """

    layer: int
    expert_ids: Tensor
    gate_weights: Tensor
    dispatched_ids: Tensor
    router_logits: Tensor

    def expert_load(self) -> Tensor:
        """(E,) assignments the router chose per expert (before capacity)."""
        return expert_load(self.expert_ids, self.router_logits.shape[1])

    def balance_ratio(self) -> float:
        """max / mean of :meth:`expert_load` (1.0 is perfect)."""
        load = self.expert_load()
        return float(load.max() / load.mean())


@dataclass
class MoEOutput:
    """Output of :meth:`MoELM.forward`.

    Attributes:
        logits: (B, T, V).
        losses: scalars. ``aux`` (Switch, alpha=1), ``z`` (router z-loss) and ``device``
            (DeepSeek-V2, alpha=1), each the mean over MoE layers; with targets also ``lm``
            (cross-entropy) and ``loss`` = lm + aux_loss_coef*aux + z_loss_coef*z +
            device_loss_coef*device, the training objective.
        routing: one :class:`RoutingRecord` per MoE layer, in layer order.
    """

    logits: Tensor
    losses: dict[str, Tensor]
    routing: list[RoutingRecord]


class Router(nn.Module):
    """Linear router in float32; owns the noise projection or the loss-free bias."""

    expert_bias: Tensor  # (E,) buffer, sigmoid_bias router only

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # nn.Linear's default init (kaiming uniform), as DeepSeek-V3's Gate: logits of
        # std ~0.6 on unit-RMS inputs, so tokens differ in their preferences from the start
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if cfg.router == "noisy_topk":  # Shazeer 2017 initialises W_noise to zero
            self.noise_weight = nn.Parameter(torch.zeros(cfg.n_experts, cfg.d_model))
        if cfg.router == "sigmoid_bias":  # not learned: updated by MoELM.update_expert_bias
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))

    def forward(self, x: Tensor) -> RouterOutput:  # x (N, D)
        xf = x.float()  # router math in float32 even when the model runs in bf16
        logits = F.linear(xf, self.weight.float())  # (N, E)
        noise_std = None
        if self.cfg.router == "noisy_topk" and self.training:
            noise_std = F.softplus(F.linear(xf, self.noise_weight.float()))  # (N, E)
        bias = self.expert_bias if self.cfg.router == "sigmoid_bias" else None
        return route(logits, self.cfg, expert_bias=bias, noise_std=noise_std)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed SwiGLU experts (stacked weights) plus optional shared experts."""

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        e, d, f = cfg.n_experts, cfg.d_model, cfg.expert_d_ff
        self.router = Router(cfg)
        self.w1 = nn.Parameter(torch.randn(e, d, f) * 0.02)  # (E, D, F)
        self.w3 = nn.Parameter(torch.randn(e, d, f) * 0.02)  # (E, D, F)
        self.w2 = nn.Parameter(torch.randn(e, f, d) * 0.02 / math.sqrt(2 * cfg.n_layers))
        # n shared experts of width F are one SwiGLU of width n*F (same function)
        self.shared = SwiGLU(d, cfg.n_shared_experts * f) if cfg.n_shared_experts else None

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], RoutingRecord]:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # (N, D)
        r: RouterOutput = self.router(flat)
        n, w = r.dispatched_ids.shape
        ids = r.dispatched_ids.reshape(-1)  # (N*W,)
        slots = torch.nonzero(ids >= 0).squeeze(1)  # (A,) assignments that run
        slots = slots[torch.argsort(ids[slots], stable=True)]  # grouped by expert
        tok = slots // w  # (A,)
        gate = r.dispatched_weights.reshape(-1)[slots].to(x.dtype)  # (A,)
        counts = torch.bincount(ids[slots], minlength=self.cfg.n_experts).tolist()
        out = flat.new_zeros(n * w, d)  # (N*W, D) one row per slot
        start = 0
        for i, c in enumerate(counts):  # loop over experts, each on its contiguous slice
            if c:
                s = slice(start, start + c)
                xs = flat[tok[s]]  # (c, D)
                h = F.silu(xs @ self.w1[i]) * (xs @ self.w3[i])  # (c, F)
                out[slots[s]] = (h @ self.w2[i]) * gate[s, None]  # (c, D)
                start += c
        y = out.view(n, w, d).sum(1)  # (N, D) deterministic combine
        if self.shared is not None:
            y = y + self.shared(flat)
        losses = {
            "aux": switch_aux_loss(r.probs, r.expert_ids, self.cfg.n_experts),
            "z": router_z_loss(r.logits),
            "device": device_balance_loss(
                r.probs, r.expert_ids, self.cfg.n_experts, self.cfg.n_devices
            ),
        }
        record = RoutingRecord(
            self.layer,
            r.expert_ids.detach(),
            r.gate_weights.detach(),
            r.dispatched_ids.detach(),
            r.logits.detach(),
        )
        return y.view(b, t, d), losses, record


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, D)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.is_moe = (layer + 1) % cfg.moe_every == 0
        self.ffn: nn.Module = (
            MoE(cfg, layer) if self.is_moe else SwiGLU(cfg.d_model, cfg.dense_d_ff)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor] | None, RoutingRecord | None]:
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        if not self.is_moe:
            return x + self.ffn(self.norm2(x)), None, None
        y, losses, record = self.ffn(self.norm2(x))
        return x + y, losses, record


class MoELM(nn.Module):
    """Decoder-only MoE language model; ``forward(idx, targets)`` returns a :class:`MoEOutput`."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (nanoGPT)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "router" not in name:
                std = (
                    0.02 / math.sqrt(2 * cfg.n_layers)
                    if name.endswith(("proj.weight", "w2.weight"))
                    else 0.02
                )
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> MoEOutput:
        b, t = idx.shape  # (B, T) int64 token ids
        if t > self.cfg.max_seq_len:
            raise InputError(
                f"longer than max_seq_len {self.cfg.max_seq_len}", field="seq_len", value=t
            )
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, D)
        per_layer: list[dict[str, Tensor]] = []
        routing: list[RoutingRecord] = []
        for block in self.blocks:
            x, losses, record = block(x)
            if record is not None:
                per_layer.append(losses)
                routing.append(record)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        zero = logits.new_zeros((), dtype=torch.float32)
        out = {
            k: sum((d[k] for d in per_layer), zero) / max(1, len(per_layer))
            for k in ("aux", "z", "device")
        }
        if targets is not None:
            out["lm"] = F.cross_entropy(logits.float().view(b * t, -1), targets.reshape(-1))
            out["loss"] = (
                out["lm"]
                + self.cfg.aux_loss_coef * out["aux"]
                + self.cfg.z_loss_coef * out["z"]
                + self.cfg.device_loss_coef * out["device"]
            )
        return MoEOutput(logits, out, routing)

    @torch.no_grad()
    def update_expert_bias(self, routing: list[RoutingRecord], rate: float | None = None) -> None:
        """Loss-free balancing step (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2).

        For each MoE layer: ``bias += rate * sign(mean_load - load)``, with the expert load
        the router chose in ``routing`` (the records of the step's forward pass);
        ``rate`` defaults to ``cfg.bias_update_rate``. Only for the ``sigmoid_bias`` router.
        """
        if self.cfg.router != "sigmoid_bias":
            raise InputError(
                "loss-free balancing needs router sigmoid_bias",
                field="router",
                value=self.cfg.router,
            )
        gamma = self.cfg.bias_update_rate if rate is None else rate
        for rec in routing:
            load = rec.expert_load()  # (E,)
            bias = cast(MoE, self.blocks[rec.layer].ffn).router.expert_bias
            bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
