"""Importers from external routing-trace formats into :class:`RoutingTrace`."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from moesim.errors import InputError
from moesim.traces.store import MAX_EXPERTS, RoutingTrace, TraceWriter, check_layer, write_trace
from moesim.yamlio import validation_to_input_error

__all__ = [
    "FORMATS",
    "counts_to_assignments",
    "import_counts_json",
    "import_flame_jsonl",
    "import_trace",
    "import_vllm_npy",
    "load_counts_json",
]

FORMATS = ("flame-jsonl", "vllm-npy", "counts-json")

#: layer numbers a trace stores (its ``layer`` column is int16)
_LAYER = Field(strict=True, ge=0, le=np.iinfo(np.int16).max)
#: a count of tokens: an integer (never a float truncated), at most what int32 holds
_COUNT = Field(strict=True, ge=0, le=np.iinfo(np.int32).max)


class _FlameRow(BaseModel):
    """One (layer, token) line of a FLAME-MoE JSONL trace."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    layer: Annotated[int, _LAYER]
    token: Annotated[int, Field(strict=True, ge=0)]
    experts: list[Annotated[int, Field(strict=True)]]
    weights: list[Annotated[float, Field(strict=True)]]


_FLAME_ROW = TypeAdapter(_FlameRow)
#: one domain of a counts JSON: per layer, {expert id: count}; ids are JSON keys (strings
#: holding integers), counts JSON integers
_COUNT_TABLES = TypeAdapter(
    list[dict[Annotated[int, Field(ge=0, lt=MAX_EXPERTS)], Annotated[int, _COUNT]]]
)


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
        try:
            lines = list(enumerate(fh, 1))
        except UnicodeDecodeError:
            raise InputError("not UTF-8 text", file=path) from None
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise InputError(f"line {lineno} is not JSON", file=path) from None
        if isinstance(obj, dict) and obj.get("type") == "meta":
            meta = obj
            continue
        try:
            row = _FLAME_ROW.validate_python(obj)
        except ValidationError as exc:
            err = validation_to_input_error(exc, path)
            raise InputError(
                f"line {lineno}: {err.message}", file=path, field=err.field, value=err.value
            ) from None
        if len(row.experts) != len(row.weights):
            raise InputError(
                f"line {lineno}: experts and weights differ in length",
                file=path,
                field="weights",
                value=len(row.weights),
            )
        if row.token in rows.setdefault(row.layer, {}):
            raise InputError(
                f"line {lineno}: layer {row.layer} token {row.token} given twice",
                file=path,
                field="token",
                value=row.token,
            )
        rows[row.layer][row.token] = (row.experts, row.weights)
    if not rows:
        raise InputError("no routing rows", file=path)
    layers = sorted(rows)
    tokens = sorted(rows[layers[0]])
    top_k = len(rows[layers[0]][tokens[0]][0])
    if top_k == 0:
        raise InputError("a token with no experts", file=path, field="experts", value=[])
    ids = np.empty((len(layers), len(tokens), top_k), dtype=np.int64)
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
        check_layer(ids[li], ws[li], num_experts, layer, path)  # before narrowing to int32
    trace = RoutingTrace(
        expert_ids=ids.astype(np.int32),
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


def import_vllm_npy(
    src: str | Path,
    out: str | Path,
    *,
    num_experts: int,
    layers: Sequence[int] | None = None,
    force: bool = False,
) -> Path:
    """Import vLLM routed-expert arrays: one ``.npy`` per request, shape (seq_len, layers, top_k).

    ``src`` is one file or a folder of them (taken in name order). Each request's tokens
    are appended in order and tagged with its index in the ``sequence`` column. vLLM
    records no gate weights, so they are stored as 1/top_k (metadata says so).
    """
    src = Path(src)
    files = sorted(src.glob("*.npy")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        raise InputError("no .npy files found", file=src)
    arrays: list[tuple[Path, np.ndarray]] = []
    for f in files:
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"not a readable .npy file ({exc})", file=f) from None
        if not isinstance(a, np.ndarray):  # np.load opened an .npz archive
            raise InputError("an .npz archive, not an .npy array", file=f)
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
            raise InputError(
                "expected an integer array of shape [seq_len, layers, top_k]",
                file=f,
                field="shape",
                value=f"{a.shape} {a.dtype}",
            )
        if arrays and a.shape[1:] != arrays[0][1].shape[1:]:
            raise InputError(
                f"layers/top_k differ from {arrays[0][0].name}",
                file=f,
                field="shape",
                value=a.shape,
            )
        arrays.append((f, a))
    n_layers, top_k = arrays[0][1].shape[1:]
    layer_ids = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != n_layers:
        raise InputError(
            f"--layers names {len(layer_ids)} layers, the arrays hold {n_layers}",
            field="layers",
            value=",".join(map(str, layer_ids)),
        )
    meta = {
        "model": "",
        "source": f"vllm-npy import of {src.name}",
        "capture": {"requests": len(arrays), "gate_weights": "not recorded (stored as 1/top_k)"},
    }
    first = 0
    with TraceWriter(
        out,
        num_experts=num_experts,
        top_k=top_k,
        layers=layer_ids,
        meta=meta,
        optional_columns=("sequence",),
        force=force,
    ) as w:
        for req, (f, a) in enumerate(arrays):
            n = a.shape[0]
            tok = np.arange(first, first + n, dtype=np.int64)
            for li, layer in enumerate(layer_ids):
                ids = np.asarray(a[:, li, :])
                if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
                    bad = ids[(ids < 0) | (ids >= num_experts)][0]
                    raise InputError(
                        f"expert id out of range 0..{num_experts - 1} (layer index {li})",
                        file=f,
                        field="expert_ids",
                        value=int(bad),
                    )
                w.write(layer, ids, None, token=tok, sequence=np.full(n, req, dtype=np.int64))
            first += n
    return Path(out)


def _layers_from_meta(data: dict[str, object], n: int) -> list[int]:
    """Model layer numbers of the count lists: from ``_meta.layers_in_expert_counts`` when it
    says "model layer a, b, c", else 0..n-1."""
    meta = data.get("_meta")
    text = meta.get("layers_in_expert_counts") if isinstance(meta, dict) else None
    if isinstance(text, str) and "model layer" in text:
        nums = [int(x) for x in re.findall(r"\d+", text.split("model layer", 1)[1])]
        if len(nums) >= n:
            twice = [x for x in nums[:n] if nums[:n].count(x) > 1]
            if twice or max(nums[:n]) > np.iinfo(np.int16).max:
                raise InputError(
                    "names a layer twice" if twice else "a layer number beyond int16",
                    field="_meta.layers_in_expert_counts",
                    value=twice[0] if twice else max(nums[:n]),
                )
            return nums[:n]
    return list(range(n))


def counts_top_k(path: str | Path, model: str) -> int | None:
    """The top-k a counts file's metadata gives ``model`` (``_meta.models.<model>`` saying
    e.g. "64 experts, top-8"), or None when it does not say."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None  # the loader reports what is wrong with the file
    meta = data.get("_meta") if isinstance(data, dict) else None
    models = meta.get("models") if isinstance(meta, dict) else None
    text = models.get(model) if isinstance(models, dict) else None
    found = re.search(r"\btop-(\d+)\b", text) if isinstance(text, str) else None
    return int(found.group(1)) if found else None


def load_counts_json(
    path: str | Path,
    *,
    model: str | None = None,
    domain: str | None = None,
    kind: str = "expert_counts",
    num_experts: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """Per-layer expert counts from a counts JSON ``{model: {kind: {domain: [{id: n}, ...]}}}``
    (``model``: the file's first by default; ``domain``: all of them summed by default).

    Returns the model layer of each list entry and the (L, E) int64 counts.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise InputError("a key given twice in one object", file=path, value=exc.key) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"not JSON ({exc.__class__.__name__})", file=path) from None
    if model is None:
        models = [k for k in data if not k.startswith("_")] if isinstance(data, dict) else []
        if not models:
            raise InputError("no model in the counts file", file=path)
        model = models[0]
    node: object = data
    for field_name, key in (("model", model), ("kind", kind)):
        node = _child(node, key, path, field_name)
    if not isinstance(node, dict) or not node:
        raise InputError(
            "expected {domain: [per-layer counts]}",
            file=path,
            field=f"{model}.{kind}",
            value=type(node).__name__,
        )
    domains = [domain] if domain is not None else sorted(node)
    per_domain = [_count_tables(_child(node, d, path, "domain"), path, d) for d in domains]
    if len({len(t) for t in per_domain}) > 1:
        raise InputError(
            "the domains list different numbers of layers; choose one", file=path, field="domain"
        )
    ids = [ex for tables in per_domain for t in tables for ex in t]
    if not ids:
        raise InputError("no expert counts", file=path, field=f"{model}.{kind}")
    e = num_experts or 1 + max(ids)
    counts = np.zeros((len(per_domain[0]), e), dtype=np.int64)
    for tables in per_domain:
        for li, t in enumerate(tables):
            for ex, c in t.items():
                if not 0 <= ex < e:
                    raise InputError(
                        f"expert id out of range 0..{e - 1}",
                        file=path,
                        field="expert_id",
                        value=ex,
                    )
                if c < 0:
                    raise InputError("negative count", file=path, field=f"expert {ex}", value=c)
                counts[li, ex] += c
    try:
        layers = _layers_from_meta(data, len(counts))
    except InputError as err:
        raise InputError(err.message, file=path, field=err.field, value=err.value) from None
    return layers, counts


def _child(node: object, key: str, path: Path, field_name: str) -> object:
    """``node[key]``, or an :class:`InputError` listing the keys the file has there."""
    if not isinstance(node, dict) or key not in node:
        valid = (
            ", ".join(k for k in node if not k.startswith("_")) if isinstance(node, dict) else ""
        )
        raise InputError(f"not in file; valid: {valid}", file=path, field=field_name, value=key)
    return node[key]


def _count_tables(node: object, path: Path, domain: str) -> list[dict[int, int]]:
    """One domain's per-layer ``{expert id: count}`` tables: ids integers, counts
    non-negative integers (a float is refused, never truncated), no id twice in a table."""
    if not isinstance(node, list) or not node or not all(isinstance(x, dict) for x in node):
        raise InputError("expected a list of {expert_id: count} tables", file=path, field=domain)
    try:
        tables = _COUNT_TABLES.validate_python(node)
    except ValidationError as exc:
        err = exc.errors()[0]
        li, key = err["loc"][0], err["loc"][1] if len(err["loc"]) > 1 else None
        what = "expert ids are integers" if "[key]" in err["loc"] else err["msg"]
        raise InputError(
            f"{what} (layer list entry {li})",
            file=path,
            field=f"{domain}[{li}]" + (f".{key}" if key is not None else ""),
            value=err.get("input"),
        ) from None
    for li, (raw, t) in enumerate(zip(node, tables, strict=True)):
        if len(t) != len(raw):  # "1" and "01" both expert 1
            seen: dict[int, str] = {}
            for k in raw:
                if int(k) in seen:
                    raise InputError(
                        f"expert {int(k)} listed twice (as {seen[int(k)]!r} and {k!r})",
                        file=path,
                        field=f"{domain}[{li}]",
                        value=k,
                    )
                seen[int(k)] = k
    return tables


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads``'s object hook: a key given twice in one object is an error (JSON
    would keep the last silently)."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def counts_to_assignments(counts: np.ndarray, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """(T, top_k) expert ids whose per-expert counts equal ``counts`` (E,) exactly, with
    distinct experts per token.

    The multiset of ids, sorted by expert, fills a (top_k, T) array row by row; column t is
    token t's experts. An expert's copies are consecutive, and there are at most T of them
    (one per token), so no column holds the same expert twice. Tokens are then shuffled.
    """
    total = int(counts.sum())
    if total % top_k:
        raise InputError(
            f"counts sum to {total}, not a multiple of top_k {top_k}", field="top_k", value=top_k
        )
    t = total // top_k
    if counts.max() > t:
        raise InputError(
            f"an expert is counted {int(counts.max())} times, more than the {t} tokens",
            field="counts",
            value=int(counts.max()),
        )
    ids = np.repeat(np.arange(counts.size, dtype=np.int32), counts).reshape(top_k, t).T
    return ids[rng.permutation(t)]


def import_counts_json(
    src: str | Path,
    out: str | Path,
    *,
    model: str,
    domain: str,
    top_k: int,
    kind: str = "expert_counts",
    num_experts: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Expand per-layer expert counts into a trace with exactly those counts.

    Each layer's tokens are drawn independently (seeded), so the trace carries the
    measured loads but no cross-layer correlation; gate weights are stored as 1/top_k.
    """
    layers, counts = load_counts_json(
        src, model=model, domain=domain, kind=kind, num_experts=num_experts
    )
    rng = np.random.default_rng(seed)
    per_layer = [counts_to_assignments(c, top_k, rng) for c in counts]
    if len({p.shape[0] for p in per_layer}) != 1:
        raise InputError("layers imply different token counts", file=src, field=domain)
    n = per_layer[0].shape[0]
    trace = RoutingTrace(
        expert_ids=np.stack(per_layer),
        gate_weights=np.full((len(layers), n, top_k), 1.0 / top_k, dtype=np.float32),
        steps=np.zeros(n, dtype=np.int32),
        layers=tuple(layers),
        num_experts=counts.shape[1],
        meta={
            "model": model,
            "source": f"counts-json import of {Path(src).name}",
            "capture": {
                "model": model,
                "domain": domain,
                "kind": kind,
                "seed": seed,
                "gate_weights": "not recorded (stored as 1/top_k)",
                "cross_layer": "independent per layer",
            },
        },
    )
    return write_trace(trace, out, force=force)


def import_trace(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    layers: Sequence[int] | None = None,
    model: str | None = None,
    domain: str | None = None,
    kind: str = "expert_counts",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Import ``src`` in format ``fmt`` (one of :data:`FORMATS`) into the trace ``out``
    (``force``: into a folder holding other files, see :class:`TraceWriter`)."""
    if num_experts is not None and not 0 < num_experts <= MAX_EXPERTS:
        raise InputError(f"expected 1..{MAX_EXPERTS}", field="experts", value=num_experts)
    if top_k is not None and top_k < 1:
        raise InputError("expected 1 or more", field="top-k", value=top_k)
    if fmt == "flame-jsonl":
        trace = import_flame_jsonl(src, num_experts=num_experts or 64)
        return write_trace(trace, out, force=force)
    if fmt == "vllm-npy":
        if num_experts is None:
            raise InputError("vllm-npy needs --experts (the arrays do not say)", field="experts")
        return import_vllm_npy(src, out, num_experts=num_experts, layers=layers, force=force)
    if fmt == "counts-json":
        if top_k is None and model:
            top_k = counts_top_k(src, model)
        if not (model and domain and top_k):
            raise InputError(
                "counts-json needs --model, --domain and --top-k (unless its _meta.models "
                "entry says top-K)",
                field="format",
                value=fmt,
            )
        return import_counts_json(
            src,
            out,
            model=model,
            domain=domain,
            top_k=top_k,
            kind=kind,
            num_experts=num_experts,
            seed=seed,
            force=force,
        )
    raise InputError(
        f"unknown import format; valid: {', '.join(FORMATS)}", field="format", value=fmt
    )
