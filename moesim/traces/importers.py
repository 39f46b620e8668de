"""Importers from external routing-trace formats into :class:`RoutingTrace`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.traces.store import RoutingTrace

__all__ = ["import_flame_jsonl"]


def import_flame_jsonl(path: str | Path, num_experts: int = 64) -> RoutingTrace:
    """Read the FLAME-MoE JSONL trace: a meta line, then one object per (layer, token).

    Each object is ``{"layer": L, "token": t, "experts": [k ids], "weights": [k probs]}``.
    Every layer must hold the same tokens (row t is token t in every layer).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    meta: dict[str, object] = {}
    rows: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"line {lineno} is not JSON", file=path) from None
            if obj.get("type") == "meta":
                meta = obj
                continue
            try:
                layer, token = int(obj["layer"]), int(obj["token"])
                experts, weights = list(obj["experts"]), list(obj["weights"])
            except (KeyError, TypeError, ValueError):
                raise InputError(
                    f"line {lineno} lacks layer/token/experts/weights", file=path
                ) from None
            if len(experts) != len(weights):
                raise InputError(
                    f"line {lineno}: experts and weights differ in length",
                    file=path,
                    field="weights",
                    value=len(weights),
                )
            rows.setdefault(layer, {})[token] = (experts, weights)
    if not rows:
        raise InputError("no routing rows", file=path)
    layers = sorted(rows)
    tokens = sorted(rows[layers[0]])
    top_k = len(rows[layers[0]][tokens[0]][0])
    ids = np.empty((len(layers), len(tokens), top_k), dtype=np.int32)
    ws = np.empty((len(layers), len(tokens), top_k), dtype=np.float32)
    for li, layer in enumerate(layers):
        if sorted(rows[layer]) != tokens:
            raise InputError("layers hold different tokens", file=path, field="token", value=layer)
        for ti, tok in enumerate(tokens):
            e, w = rows[layer][tok]
            if len(e) != top_k:
                raise InputError(
                    f"layer {layer} token {tok}: expected {top_k} experts",
                    file=path,
                    field="experts",
                    value=len(e),
                )
            ids[li, ti] = e
            ws[li, ti] = w
    trace = RoutingTrace(
        expert_ids=ids,
        gate_weights=ws,
        steps=np.zeros(len(tokens), dtype=np.int32),
        layers=tuple(layers),
        num_experts=num_experts,
        meta={
            "model": "FLAME-MoE-290M",
            "source": f"flame-jsonl import of {path.name}",
            "capture": {k: v for k, v in meta.items() if k != "type"},
        },
    )
    trace.validate(path)
    return trace
