"""MoE model shapes: the published architecture of a model, and what follows from it.

A :class:`ModelShape` is what the simulator needs to know about a model: how many
layers and which of them are MoE, the widths of attention and of each FFN, the
router (experts, top-k, shared experts) and the vocabulary. Parameter counts are
computed from the shape, never typed in.
"""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesim.errors import InputError
from moesim.paths import models_dir
from moesim.yamlio import load_yaml_model

__all__ = [
    "Attention",
    "ModelShape",
    "get_preset",
    "list_presets",
    "load_shape",
]

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Attention(BaseModel):
    """Attention shape: multi-head / grouped-query (``mha``) or multi-head latent (``mla``)."""

    model_config = _STRICT
    kind: Literal["mha", "mla"] = "mha"
    num_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0, description="GQA groups; None = num_heads")
    head_dim: int | None = Field(default=None, gt=0, description="None = d_model / num_heads")
    qkv_bias: bool = False
    # Multi-head latent attention (DeepSeek-V2/V3)
    q_lora_rank: int | None = Field(default=None, gt=0)
    kv_lora_rank: int | None = Field(default=None, gt=0)
    qk_nope_head_dim: int | None = Field(default=None, gt=0)
    qk_rope_head_dim: int | None = Field(default=None, gt=0)
    v_head_dim: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _mla_complete(self) -> Attention:
        if self.kind == "mla":
            for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, f) is None:
                    raise ValueError(f"mla attention needs '{f}'")
        return self


class ModelShape(BaseModel):
    """Published shape of an MoE transformer.

    ``architecture: encoder-decoder`` (Switch Transformer) means ``num_layers`` layers in
    each of the two stacks; decoder layers add cross-attention. ``moe_layers`` are
    0-based indices into the (decoder-only) layer list; for encoder-decoder they apply
    to both stacks.
    """

    model_config = _STRICT
    name: str
    architecture: Literal["decoder", "encoder-decoder"] = "decoder"
    num_layers: int = Field(gt=0)
    moe_layers: list[int] | None = Field(
        default=None, description="Explicit MoE layer indices; overrides the two fields below"
    )
    first_k_dense: int = Field(default=0, ge=0, description="Leading dense layers")
    moe_every: int = Field(default=1, gt=0, description="After those, every n-th layer is MoE")
    d_model: int = Field(gt=0)
    dense_d_ff: int | None = Field(default=None, gt=0, description="FFN width of dense layers")
    expert_d_ff: int = Field(gt=0, description="FFN width of one routed expert")
    num_experts: int = Field(gt=0, description="Routed experts per MoE layer")
    top_k: int = Field(gt=0)
    num_shared_experts: int = Field(default=0, ge=0)
    expert_groups: int | None = Field(
        default=None,
        gt=0,
        description="Group-limited routing: the experts split into this many equal groups "
        "(contiguous ids; DeepSeek's n_group)",
    )
    groups_per_token: int | None = Field(
        default=None,
        gt=0,
        description="Group-limited routing: a token's experts lie in at most this many "
        "groups (DeepSeek's topk_group; nodes, where each node holds whole groups)",
    )
    shared_expert_d_ff: int | None = Field(default=None, gt=0, description="None = expert_d_ff")
    shared_expert_gate: bool = False
    router_bias: bool = False
    ffn_activation: Literal["swiglu", "geglu", "relu", "gelu"] = "swiglu"
    attention: Attention
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    vocab_size: int = Field(gt=0)
    tie_embeddings: bool = False
    source: str = Field(min_length=1)
    published_total_params: float | None = Field(default=None, gt=0)
    published_active_params: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ModelShape:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe_layers index {bad[0]} outside 0..{self.num_layers - 1}")
        if len(self.moe_layer_indices()) < self.num_layers and self.dense_d_ff is None:
            raise ValueError("the model has dense layers, so 'dense_d_ff' is required")
        if (self.expert_groups is None) != (self.groups_per_token is None):
            raise ValueError("give both 'expert_groups' and 'groups_per_token', or neither")
        if self.groups is not None:
            from moesim.traces.synthetic import check_groups

            try:
                check_groups(self.groups, self.num_experts, self.top_k)
            except InputError as err:
                raise ValueError(f"expert_groups, groups_per_token: {err.message}") from None
        return self

    @property
    def groups(self) -> tuple[int, int] | None:
        """(expert groups, groups per token) of a group-limited router; None: no limit."""
        if self.expert_groups is None or self.groups_per_token is None:
            return None
        return (self.expert_groups, self.groups_per_token)

    # ----- derived shape ---------------------------------------------------------------
    def moe_layer_indices(self) -> list[int]:
        """0-based indices of the MoE layers (in one stack)."""
        if self.moe_layers is not None:
            return sorted(set(self.moe_layers))
        return [
            i
            for i in range(self.first_k_dense, self.num_layers)
            if (i - self.first_k_dense) % self.moe_every == 0
        ]

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the whole model (both stacks for encoder-decoder)."""
        return len(self.moe_layer_indices()) * self._stacks

    @property
    def num_dense_layers(self) -> int:
        return (self.num_layers - len(self.moe_layer_indices())) * self._stacks

    @property
    def _stacks(self) -> int:
        return 2 if self.architecture == "encoder-decoder" else 1

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices per FFN: 3 for gated (SwiGLU/GeGLU), 2 otherwise."""
        return 3 if self.ffn_activation in ("swiglu", "geglu") else 2

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.num_heads

    # ----- parameter counts --------------------------------------------------------------
    def attention_params(self) -> int:
        """Weights of one self-attention block (projections, plus MLA's latent norms)."""
        a, d = self.attention, self.d_model
        if a.kind == "mla":
            assert a.kv_lora_rank and a.qk_nope_head_dim and a.qk_rope_head_dim and a.v_head_dim
            qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
            if a.q_lora_rank:
                q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk_dim
            else:
                q = d * a.num_heads * qk_dim
            kv = (
                d * (a.kv_lora_rank + a.qk_rope_head_dim)
                + a.kv_lora_rank
                + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
            )
            o = a.num_heads * a.v_head_dim * d
            return q + kv + o
        kv_heads = a.num_kv_heads or a.num_heads
        hd = self.head_dim
        q = d * a.num_heads * hd
        kv = 2 * d * kv_heads * hd
        o = a.num_heads * hd * d
        bias = (a.num_heads + 2 * kv_heads) * hd if a.qkv_bias else 0
        return q + kv + o + bias

    def expert_params(self) -> int:
        """Weights of one routed expert."""
        return self.ffn_matrices * self.d_model * self.expert_d_ff

    def shared_expert_params(self) -> int:
        """Weights of all shared experts of one MoE layer (plus their gate)."""
        d_ff = self.shared_expert_d_ff or self.expert_d_ff
        gate = self.d_model if self.shared_expert_gate and self.num_shared_experts else 0
        return self.num_shared_experts * self.ffn_matrices * self.d_model * d_ff + gate

    def router_params(self) -> int:
        return self.d_model * self.num_experts + (self.num_experts if self.router_bias else 0)

    def _norm_params(self) -> int:
        return self.d_model * (2 if self.norm == "layernorm" else 1)

    def _layer_params(self, moe: bool, experts_counted: int, cross_attention: bool) -> int:
        attn = self.attention_params() * (2 if cross_attention else 1)
        norms = self._norm_params() * (3 if cross_attention else 2)
        if moe:
            ffn = (
                experts_counted * self.expert_params()
                + self.shared_expert_params()
                + self.router_params()
            )
        else:
            assert self.dense_d_ff is not None
            ffn = self.ffn_matrices * self.d_model * self.dense_d_ff
        return attn + norms + ffn

    def _count(self, experts_counted: int) -> int:
        try:
            return _count_params(self, experts_counted)
        except TypeError:  # a list field (``moe_layers``) makes the shape unhashable
            return _count_params.__wrapped__(self, experts_counted)

    def total_params(self) -> int:
        """All weights, embeddings and output head included."""
        return self._count(self.num_experts)

    def active_params(self) -> int:
        """Weights one token touches: every routed expert beyond its top-k is left out."""
        return self._count(self.top_k)

    def expert_param_bytes(self, bytes_per_param: float) -> float:
        return self.expert_params() * bytes_per_param

    def dense_params_per_layer(self, moe: bool = True) -> int:
        """Non-expert weights of one MoE layer (attention, norms, router, shared experts),
        or with ``moe`` False of one dense layer (attention, norms, dense FFN)."""
        return self._layer_params(moe, 0, False)


def list_presets() -> list[str]:
    """Names of the bundled model presets, sorted."""
    return sorted(load_shape(p).name for p in models_dir().glob("*.yaml"))


def load_shape(path: Path) -> ModelShape:
    return load_yaml_model(path, ModelShape)


@cache
def _preset_files() -> dict[str, Path]:
    return {load_shape(p).name.lower(): p for p in sorted(models_dir().glob("*.yaml"))}


@lru_cache(maxsize=64)
def _count_params(shape: ModelShape, experts_counted: int) -> int:
    """Weights of a (frozen) shape counting ``experts_counted`` routed experts per MoE
    layer, kept per process: a sweep's cases ask the same shapes."""
    moe_idx = set(shape.moe_layer_indices())
    total = 0
    for stack in range(shape._stacks):
        cross = stack == 1  # the decoder of an encoder-decoder model
        for i in range(shape.num_layers):
            total += shape._layer_params(i in moe_idx, experts_counted, cross)
        total += shape._norm_params()  # final norm of the stack
    embed = shape.vocab_size * shape.d_model
    total += embed if shape.tie_embeddings else 2 * embed
    return total


def get_preset(name: str) -> ModelShape:
    """The bundled preset called ``name`` (case-insensitive)."""
    files = _preset_files()
    if name.lower() not in files:
        raise InputError(
            f"unknown model preset; valid names: {', '.join(list_presets())}",
            field="model",
            value=name,
        )
    return _load_preset(files[name.lower()])


@cache
def _load_preset(path: Path) -> ModelShape:
    """A bundled preset, read once per process (shapes are frozen): a sweep's cases share it."""
    return load_shape(path)
