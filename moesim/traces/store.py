"""The trace store: routing decisions as Parquet, one row per (step, layer, token).

Layout (a folder, hive-partitioned by layer)::

    TRACE/
      layer=2/part-0.parquet
      layer=3/part-0.parquet
      ...

Columns of every file:

====================  ==============================  =========================================
column                type                            meaning
====================  ==============================  =========================================
``step``              int32                           step (batch) the token belongs to
``layer``             int16                           model layer index of this MoE layer
``token``             int64                           token index within the trace, the same
                                                      token in every layer
``expert_ids``        fixed_size_list<int32>[top_k]   selected experts, by descending gate weight
``gate_weights``      fixed_size_list<float32>[top_k] router weights in the same order
====================  ==============================  =========================================

Parquet key-value metadata (``moesim.*`` keys, JSON values) records ``model``,
``num_experts``, ``top_k``, ``layers``, ``source`` and ``capture`` settings.
Files are zstd-compressed and written to a temporary folder that is renamed into
place, so an interrupted write never leaves a half trace behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.errors import InputError

__all__ = ["RoutingTrace", "check_layer", "read_trace", "trace_schema", "write_trace"]


def trace_schema(top_k: int) -> pa.Schema:
    return pa.schema(
        [
            ("step", pa.int32()),
            ("layer", pa.int16()),
            ("token", pa.int64()),
            ("expert_ids", pa.list_(pa.int32(), top_k)),
            ("gate_weights", pa.list_(pa.float32(), top_k)),
        ]
    )


@dataclass(frozen=True)
class RoutingTrace:
    """Routing of N tokens through L MoE layers, in memory.

    Attributes:
        expert_ids: (L, N, K) int32, each token's experts by descending gate weight.
        gate_weights: (L, N, K) float32, in the same order.
        steps: (N,) int32, step of each token.
        layers: the model layer index of each of the L trace layers.
    """

    expert_ids: np.ndarray
    gate_weights: np.ndarray
    steps: np.ndarray
    layers: tuple[int, ...]
    num_experts: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    def validate(self, source: str | Path = "<trace>") -> None:
        """Raise :class:`InputError` on ids out of range or bad gate weights."""
        for li, layer in enumerate(self.layers):
            check_layer(self.expert_ids[li], self.gate_weights[li], self.num_experts, layer, source)


def check_layer(
    ids: np.ndarray, weights: np.ndarray, num_experts: int, layer: int, source: str | Path
) -> None:
    """Check one layer's (N, K) ids and gate weights; raise :class:`InputError` if bad."""
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        ti = int(np.nonzero(bad)[0][0])
        raise InputError(
            f"expert id out of range 0..{num_experts - 1} (layer {layer}, token {ti})",
            file=source,
            field="expert_ids",
            value=int(ids[bad][0]),
        )
    badw = ~np.isfinite(weights) | (weights < 0)
    if badw.any():
        raise InputError(
            f"gate weights must be finite and non-negative (layer {layer})",
            file=source,
            field="gate_weights",
            value=float(weights[badw][0]),
        )


def _atomic_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))


def write_trace(trace: RoutingTrace, dest: str | Path) -> Path:
    """Write ``trace`` to the folder ``dest`` (replaced atomically if it exists)."""
    dest = Path(dest)
    trace.validate()
    tmp = _atomic_dir(dest)
    try:
        meta = {
            "model": trace.meta.get("model", ""),
            "num_experts": trace.num_experts,
            "top_k": trace.top_k,
            "layers": list(trace.layers),
            "source": trace.meta.get("source", ""),
            "capture": trace.meta.get("capture", {}),
        }
        schema = trace_schema(trace.top_k).with_metadata(
            {f"moesim.{k}": json.dumps(v, sort_keys=True) for k, v in meta.items()}
        )
        n, k = trace.num_tokens, trace.top_k
        tokens = np.arange(n, dtype=np.int64)
        for li, layer in enumerate(trace.layers):
            ids = pa.FixedSizeListArray.from_arrays(
                pa.array(trace.expert_ids[li].reshape(-1).astype(np.int32)), k
            )
            ws = pa.FixedSizeListArray.from_arrays(
                pa.array(trace.gate_weights[li].reshape(-1).astype(np.float32)), k
            )
            table = pa.Table.from_arrays(
                [
                    pa.array(trace.steps.astype(np.int32)),
                    pa.array(np.full(n, layer, dtype=np.int16)),
                    pa.array(tokens),
                    ids,
                    ws,
                ],
                schema=schema,
            )
            part = tmp / f"layer={layer}"
            part.mkdir()
            pq.write_table(table, part / "part-0.parquet", compression="zstd")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _read_meta(schema: pa.Schema) -> dict[str, Any]:
    raw = schema.metadata or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if key.startswith("moesim."):
            out[key.removeprefix("moesim.")] = json.loads(v.decode())
    return out


def read_trace(path: str | Path) -> RoutingTrace:
    """Read a whole trace folder into memory, validating it."""
    path = Path(path)
    if not path.exists():
        raise InputError("trace not found", file=path)
    parts = sorted(path.glob("layer=*/*.parquet")) if path.is_dir() else [path]
    if not parts:
        raise InputError("no 'layer=N/*.parquet' files in trace folder", file=path)
    per_layer: dict[int, list[pa.Table]] = {}
    files: dict[int, Path] = {}
    meta: dict[str, Any] = {}
    for part in parts:
        try:
            table = pq.read_table(part)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"not a readable Parquet file ({exc})", file=part) from None
        missing = {"step", "layer", "token", "expert_ids", "gate_weights"} - set(table.column_names)
        if missing:
            raise InputError("missing column", file=part, field=sorted(missing)[0])
        meta = meta or _read_meta(table.schema)
        for layer in np.unique(table.column("layer").to_numpy()):
            sub = table.filter(pa.compute.equal(table.column("layer"), layer))
            per_layer.setdefault(int(layer), []).append(sub)
            files.setdefault(int(layer), part)
    if "num_experts" not in meta:
        raise InputError("trace metadata lacks 'moesim.num_experts'", file=path)
    layers = tuple(sorted(per_layer))
    ids_l, w_l = [], []
    steps: np.ndarray | None = None
    tokens0: np.ndarray | None = None
    top_k = int(meta["top_k"])
    for layer in layers:
        table = pa.concat_tables(per_layer[layer]).sort_by("token")
        tok = table.column("token").to_numpy()
        col = table.column("expert_ids").combine_chunks()
        width = col.type.list_size if hasattr(col.type, "list_size") else None
        if width != top_k:
            raise InputError(
                f"expert_ids lists have {width} entries, metadata says top_k {top_k}",
                file=path,
                field="expert_ids",
                value=width,
            )
        ids_l.append(col.flatten().to_numpy().reshape(-1, top_k).astype(np.int32))
        wcol = table.column("gate_weights").combine_chunks()
        w_l.append(wcol.flatten().to_numpy().reshape(-1, top_k).astype(np.float32))
        check_layer(ids_l[-1], w_l[-1], int(meta["num_experts"]), layer, files[layer])
        if tokens0 is None:
            tokens0 = tok
            steps = table.column("step").to_numpy().astype(np.int32)
        elif not np.array_equal(tok, tokens0):
            raise InputError(
                "layers hold different tokens; every layer must route the same tokens",
                file=path,
                field="token",
                value=layer,
            )
    assert steps is not None
    trace = RoutingTrace(
        expert_ids=np.stack(ids_l),
        gate_weights=np.stack(w_l),
        steps=steps,
        layers=layers,
        num_experts=int(meta["num_experts"]),
        meta=meta,
    )
    return trace
