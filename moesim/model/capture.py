"""Capture the routing of a Hugging Face transformers MoE model into the trace store.

:func:`capture_hf` runs a model once on a batch of token ids and records, for every
MoE decoder layer, each token's top-k experts (by descending gate weight) and their
gate weights, exactly as the model's own router chose them. It registers forward
hooks on the router modules (``layers[i].mlp.gate`` or ``layers[i].block_sparse_moe.gate``)
and removes them when the forward pass ends, also when it fails.

Two module layouts are understood, told apart by what the router module returns:

* **router output** (transformers v5, and DeepSeek-V2/V3 in v4): the router is its own
  module and returns the selected expert ids with their weights, as
  ``(logits, weights, indices)`` (v5) or ``(indices, weights)`` (v4 DeepSeek). These
  are recorded as they are, only re-ordered by descending weight (DeepSeek's routers
  return them unsorted). Nothing is recomputed, so every family rule the model
  applies (DeepSeek-V3's correction bias, group-limited selection, scaling) is in
  the trace by construction.
* **gate logits** (transformers v4 Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the router
  is a plain ``nn.Linear`` whose output is the router logits; the top-k happens in
  the parent sparse-MoE block. The hook takes the logits and applies the family's
  rule (:func:`routing_rule`, :func:`select_experts`) exactly as that block does.

The trace's metadata records which of the two produced it (``capture.routing_from``).
Supported families (``config.model_type``): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V2 and DeepSeek-V3. Dense layers (DeepSeek's ``first_k_dense_replace``,
Qwen-MoE's ``mlp_only_layers``) have no router and are not recorded.

:func:`capture_reference` does the same for moesim's own reference MoE
(:mod:`moesim.model.reference`), whose forward pass returns its routing records.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from moesim.errors import InputError
from moesim.traces.store import RoutingTrace, write_trace

__all__ = [
    "SUPPORTED_FAMILIES",
    "RoutingRule",
    "capture_hf",
    "capture_reference",
    "find_routers",
    "routing_rule",
    "select_experts",
]

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
"""``config.model_type`` values :func:`capture_hf` knows the routing rule of."""

# Attribute names of the sparse-MoE block inside a decoder layer (v4 Mixtral: block_sparse_moe).
_MOE_BLOCK_NAMES = ("block_sparse_moe", "mlp")


@dataclass(frozen=True)
class RoutingRule:
    """How one model family turns router logits into top-k experts and gate weights.

    Attributes:
        scoring: ``softmax`` (Mixtral, Qwen, OLMoE, DeepSeek-V2) or ``sigmoid`` (DeepSeek-V3).
        top_k: experts per token.
        norm_topk_prob: divide the k selected scores by their sum.
        norm_eps: added to that sum (DeepSeek-V3 uses 1e-20).
        n_group, topk_group: group-limited selection: keep the ``topk_group`` best of
            ``n_group`` equal expert groups, choose the top-k inside them (1, 1: off).
        group_score: a group's score: its ``max`` (DeepSeek-V2) or the sum of its best
            two (``top2sum``, DeepSeek-V3).
        masked_score: score given to experts outside the kept groups.
        routed_scaling_factor: multiplies the final weights (DeepSeek).
        use_correction_bias: add the router's ``e_score_correction_bias`` to the scores
            for selection only (DeepSeek-V3); the weights stay the unbiased scores.
        weights_in_logits_dtype: cast the weights to the logits' dtype, as the v4
            sparse-MoE blocks do (``routing_weights.to(hidden_states.dtype)``).
    """

    scoring: Literal["softmax", "sigmoid"]
    top_k: int
    norm_topk_prob: bool
    norm_eps: float = 0.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2sum"] = "max"
    masked_score: float = 0.0
    routed_scaling_factor: float = 1.0
    use_correction_bias: bool = False
    weights_in_logits_dtype: bool = True


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def routing_rule(config: Any) -> RoutingRule:
    """The routing rule of the family named by ``config.model_type``.

    Raises:
        InputError: for a family outside :data:`SUPPORTED_FAMILIES`.
    """
    family = str(_cfg(config, "model_type", ""))
    top_k = int(_cfg(config, "num_experts_per_tok", 0))
    if family == "mixtral":  # softmax, top-k, always renormalised
        return RoutingRule("softmax", top_k, norm_topk_prob=True)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return RoutingRule("softmax", top_k, norm_topk_prob=bool(_cfg(config, "norm_topk_prob")))
    if family == "deepseek_v3":
        return RoutingRule(
            "sigmoid",
            top_k,
            norm_topk_prob=bool(_cfg(config, "norm_topk_prob", True)),
            norm_eps=1e-20,
            n_group=int(_cfg(config, "n_group", 1) or 1),
            topk_group=int(_cfg(config, "topk_group", 1) or 1),
            group_score="top2sum",
            masked_score=float("-inf"),
            routed_scaling_factor=float(_cfg(config, "routed_scaling_factor", 1.0)),
            use_correction_bias=True,
            weights_in_logits_dtype=False,
        )
    if family == "deepseek_v2":
        # transformers' DeepSeek-V2 router (v4 and v5) never renormalises the top-k.
        grouped = _cfg(config, "topk_method", "greedy") == "group_limited_greedy"
        return RoutingRule(
            "softmax",
            top_k,
            norm_topk_prob=False,
            n_group=int(_cfg(config, "n_group", 1) or 1) if grouped else 1,
            topk_group=int(_cfg(config, "topk_group", 1) or 1) if grouped else 1,
            group_score="max",
            routed_scaling_factor=float(_cfg(config, "routed_scaling_factor", 1.0)),
            weights_in_logits_dtype=False,
        )
    raise InputError(
        f"unsupported model family; supported: {', '.join(SUPPORTED_FAMILIES)}",
        field="config.model_type",
        value=family,
    )


def _sort_by_weight(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order each row of (N, K) ``ids`` and ``weights`` by descending weight (stable)."""
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    return ids.gather(1, order), weights.gather(1, order)


def select_experts(
    logits: torch.Tensor, rule: RoutingRule, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``rule`` to router logits, as the family's sparse-MoE block does.

    Args:
        logits: (N, E) router logits.
        rule: the family's :class:`RoutingRule`.
        correction_bias: (E,) selection-only bias (DeepSeek-V3), used when
            ``rule.use_correction_bias``.

    Returns:
        ids: (N, K) int64 expert ids, by descending gate weight.
        weights: (N, K) gate weights in the same order (float32 unless the rule keeps
        the logits' dtype, in which case they are rounded to it).
    """
    n, e = logits.shape
    x = logits.float()
    scores = x.softmax(dim=-1) if rule.scoring == "softmax" else x.sigmoid()  # (N, E)
    choice = scores
    if rule.use_correction_bias and correction_bias is not None:
        choice = scores + correction_bias.float().unsqueeze(0)
    if rule.n_group > 1:
        if e % rule.n_group or not 0 < rule.topk_group <= rule.n_group:
            raise InputError(
                f"{e} experts cannot form {rule.n_group} groups keeping {rule.topk_group}",
                field="config.n_group",
                value=rule.n_group,
            )
        grouped = choice.view(n, rule.n_group, e // rule.n_group)  # (N, G, E/G)
        if rule.group_score == "top2sum":
            group_scores = grouped.topk(min(2, e // rule.n_group), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values  # (N, G)
        keep = group_scores.topk(rule.topk_group, dim=-1).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(n, rule.n_group, e // rule.n_group)
        choice = choice.masked_fill(~expert_mask.reshape(n, e), rule.masked_score)
    ids = choice.topk(rule.top_k, dim=-1).indices  # (N, K)
    weights = scores.gather(1, ids)
    if rule.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + rule.norm_eps)
    weights = weights * rule.routed_scaling_factor
    if rule.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return _sort_by_weight(ids, weights)


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that owns the decoder layers (run it to skip the LM head) and the layers."""
    inner = getattr(model, "model", None)
    inner_layers = getattr(inner, "layers", None)
    if isinstance(inner, nn.Module) and isinstance(inner_layers, nn.ModuleList):
        return inner, inner_layers
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return model, layers
    raise InputError(
        "model has no decoder layer list (expected model.model.layers or model.layers)",
        field="model",
        value=type(model).__name__,
    )


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """The router module of every MoE decoder layer, as (layer index, router).

    The router is ``layers[i].block_sparse_moe.gate`` or ``layers[i].mlp.gate`` (v4 and
    v5); a layer without one (a dense MLP has ``gate_proj``, not ``gate``) is dense.
    """
    _, layers = _decoder_layers(model)
    found: list[tuple[int, nn.Module]] = []
    for i, layer in enumerate(layers):
        for name in _MOE_BLOCK_NAMES:
            gate = getattr(getattr(layer, name, None), "gate", None)
            if isinstance(gate, nn.Module):
                found.append((i, gate))
                break
    return found


def _num_experts(config: Any, routers: list[tuple[int, nn.Module]]) -> int:
    for name in ("num_local_experts", "n_routed_experts", "num_experts"):
        value = _cfg(config, name)
        if isinstance(value, int) and value > 0:
            return value
    weight = getattr(routers[0][1], "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    raise InputError("cannot tell the number of experts", field="config.num_experts")


def _library_version(name: str) -> str | None:
    module = sys.modules.get(name)
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _as_input_ids(input_ids: Any, vocab_size: int | None) -> torch.Tensor:
    """Validate ``input_ids`` as a (B, T) integer tensor of ids inside the vocabulary."""
    ids = torch.as_tensor(np.asarray(input_ids) if not torch.is_tensor(input_ids) else input_ids)
    if ids.ndim != 2 or ids.numel() == 0:
        raise InputError(
            "input_ids must be a non-empty (batch, tokens) array",
            field="input_ids",
            value=tuple(ids.shape),
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError("input_ids must be integers", field="input_ids", value=str(ids.dtype))
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise InputError(
            f"token ids must lie in 0..{'?' if vocab_size is None else vocab_size - 1}",
            field="input_ids",
            value=lo if lo < 0 else hi,
        )
    return ids.long()


def _model_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _from_router_output(output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices, weights) from a router that returns its selection, else ``None``.

    v5 routers return ``(logits, weights, indices)``; v4 DeepSeek routers
    ``(indices, weights)``: the indices are the 2-D integer tensor, the weights the
    floating tensor of the same shape (position 1 in every known layout).
    """
    if not isinstance(output, tuple | list):
        return None
    tensors = [(i, t) for i, t in enumerate(output) if isinstance(t, torch.Tensor)]
    ints = [t for _, t in tensors if t.ndim == 2 and not t.is_floating_point()]
    if len(ints) != 1:
        return None
    ids = ints[0]
    floats = [(i, t) for i, t in tensors if t.is_floating_point() and t.shape == ids.shape]
    if not floats:
        return None
    weights = next((t for i, t in floats if i == 1), floats[0][1])
    return ids, weights


def capture_hf(
    model: nn.Module,
    input_ids: torch.Tensor | np.ndarray,
    out: str | Path,
    *,
    step: int = 0,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
) -> RoutingTrace:
    """Run ``model`` once on ``input_ids`` and write its routing as a trace at ``out``.

    The model runs in eval mode (no router jitter, no dropout) under ``torch.no_grad()``;
    each module's train/eval flag is restored afterwards and every hook is removed,
    also when the forward pass raises. The decoder (``model.model``) is run when there
    is one, so the LM head is not computed.

    Args:
        model: a transformers MoE model (``*ForCausalLM`` or the base ``*Model``) of a
            family in :data:`SUPPORTED_FAMILIES`, v4 or v5 module layout.
        input_ids: (B, T) token ids; token ``b * T + t`` of the trace is ``input_ids[b, t]``.
        out: trace folder to write (replaced atomically if it exists).
        step: step number of every captured token.
        meta: extra metadata; ``model`` overrides the model name, every other key is
            added to the trace's ``capture`` record.
        force: write into a folder that holds other files (see
            :class:`~moesim.traces.store.TraceWriter`).

    Returns:
        The trace as written: expert_ids (L, B*T, K) int32 by descending gate weight,
        gate_weights (L, B*T, K) float32, layers = the MoE decoder layer indices.
    """
    config = getattr(model, "config", None)
    family = str(_cfg(config, "model_type", ""))
    rule = routing_rule(config)  # rejects unsupported families before any work
    if not isinstance(step, int) or not 0 <= step < 2**31:
        raise InputError("step must be an integer in 0..2**31-1", field="step", value=step)
    vocab = _cfg(config, "vocab_size")
    ids = _as_input_ids(input_ids, vocab if isinstance(vocab, int) else None)
    runner, _ = _decoder_layers(model)
    routers = find_routers(model)
    if not routers:
        raise InputError(
            "model has no MoE layer (no layers[i].mlp.gate)", field="model", value=family
        )
    num_experts = _num_experts(config, routers)
    n_tokens = ids.numel()

    records: dict[int, list[tuple[torch.Tensor, torch.Tensor, str]]] = {i: [] for i, _ in routers}

    def make_hook(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            chosen = _from_router_output(output)
            if chosen is not None:
                sel_ids, sel_w = _sort_by_weight(chosen[0].long(), chosen[1])
                how = "router-output"
            elif isinstance(output, torch.Tensor) and output.shape[-1] == num_experts:
                bias = getattr(module, "e_score_correction_bias", None)
                sel_ids, sel_w = select_experts(output.reshape(-1, num_experts), rule, bias)
                how = "gate-logits"
            else:
                raise InputError(
                    "router output is neither (.., weights, indices) nor logits",
                    field=f"model.layers[{layer}] router",
                    value=type(output).__name__,
                )
            records[layer].append((sel_ids.detach().cpu(), sel_w.detach().float().cpu(), how))

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for layer, router in routers:
            handles.append(router.register_forward_hook(make_hook(layer)))
        model.eval()
        with torch.no_grad():
            runner(input_ids=ids.to(_model_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    layers = tuple(i for i, _ in routers)
    how_used = set()
    ids_l, w_l = [], []
    for layer in layers:
        calls = records[layer]
        if len(calls) != 1:
            raise RuntimeError(f"router of layer {layer} ran {len(calls)} times, expected once")
        sel_ids, sel_w, how = calls[0]
        if sel_ids.shape[0] != n_tokens:
            raise RuntimeError(
                f"router of layer {layer} saw {sel_ids.shape[0]} tokens, expected {n_tokens}"
            )
        ids_l.append(sel_ids.numpy().astype(np.int32))
        w_l.append(sel_w.numpy().astype(np.float32))
        how_used.add(how)
    top_k = ids_l[0].shape[1]

    extra = dict(meta or {})
    name = str(extra.pop("model", "") or _cfg(config, "_name_or_path", "") or family)
    capture: dict[str, Any] = {
        "family": family,
        "transformers": _library_version("transformers"),
        "torch": torch.__version__,
        "routing_from": how_used.pop() if len(how_used) == 1 else "mixed",
        "batch": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "step": step,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    } | extra
    trace = RoutingTrace(
        expert_ids=np.stack(ids_l),
        gate_weights=np.stack(w_l),
        steps=np.full(n_tokens, step, dtype=np.int32),
        layers=layers,
        num_experts=num_experts,
        meta={
            "model": name,
            "num_experts": num_experts,
            "top_k": top_k,
            "layers": list(layers),
            "source": "hf-capture",
            "capture": capture,
        },
    )
    write_trace(trace, out, force=force)
    return trace


def capture_reference(
    model: nn.Module,
    input_ids: torch.Tensor | np.ndarray,
    out: str | Path,
    *,
    step: int = 0,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
) -> RoutingTrace:
    """Run a reference :class:`~moesim.model.reference.MoELM` once and write its routing.

    Records each MoE layer's ``RoutingRecord.expert_ids`` and ``gate_weights`` (the
    router's choice, before any capacity limit), in eval mode under ``torch.no_grad()``.

    Args:
        model: a ``MoELM`` (anything whose ``cfg`` has ``router``, ``n_experts`` and
            ``vocab_size`` and whose forward returns ``.routing`` records).
        input_ids: (B, T) token ids, T at most ``cfg.max_seq_len``.
        out: trace folder to write.
        step: step number of every captured token.
        meta: as in :func:`capture_hf`.
        force: as in :func:`capture_hf`.

    Returns:
        The trace as written: expert_ids (L, B*T, K), gate_weights (L, B*T, K).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise InputError("not a reference MoE model (no cfg)", field="model")
    if cfg.router == "expert_choice":
        raise InputError(
            "expert-choice routing picks a variable number of experts per token; "
            "the trace store needs a fixed top-k",
            field="router",
            value=cfg.router,
        )
    if not isinstance(step, int) or not 0 <= step < 2**31:
        raise InputError("step must be an integer in 0..2**31-1", field="step", value=step)
    ids = _as_input_ids(input_ids, int(cfg.vocab_size))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            output = model(ids.to(_model_device(model)))
    finally:
        for module, training in modes:
            module.training = training
    records = list(output.routing)
    if not records:
        raise InputError("model has no MoE layer", field="moe_every", value=cfg.moe_every)
    expert_ids = np.stack([r.expert_ids.cpu().numpy() for r in records]).astype(np.int32)
    gate_weights = np.stack([r.gate_weights.float().cpu().numpy() for r in records])
    layers = tuple(int(r.layer) for r in records)
    extra = dict(meta or {})
    name = str(extra.pop("model", "") or "reference-moe")
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)} if is_dataclass(cfg) else {}
    capture: dict[str, Any] = {
        "family": "moesim-reference",
        "router": cfg.router,
        "config": config,
        "torch": torch.__version__,
        "batch": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "step": step,
    } | extra
    trace = RoutingTrace(
        expert_ids=expert_ids,
        gate_weights=gate_weights.astype(np.float32),
        steps=np.full(ids.numel(), step, dtype=np.int32),
        layers=layers,
        num_experts=int(cfg.n_experts),
        meta={
            "model": name,
            "num_experts": int(cfg.n_experts),
            "top_k": int(expert_ids.shape[2]),
            "layers": list(layers),
            "source": "reference-capture",
            "capture": capture,
        },
    )
    write_trace(trace, out, force=force)
    return trace
