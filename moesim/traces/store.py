"""The trace store: routing decisions as Parquet, one row per (step, layer, token).

Layout (a folder, hive-partitioned by layer)::

    TRACE/
      layer=2/part-0.parquet
      layer=3/part-0.parquet
      ...

The layer lives in one place, the folder name, so the tools users already have open a
trace as it is, the folder key becoming a ``layer`` column: ``pandas.read_parquet(TRACE)``,
``pyarrow.dataset.dataset(TRACE, partitioning="hive")``, DuckDB's
``read_parquet('TRACE/**/*.parquet', hive_partitioning=true)`` and Polars'
``scan_parquet`` (``tests/test_trace_readers.py`` reads one with each). Traces written
before this layout also carry a ``layer`` column in every file; moesim reads them as they
are (the folder name decides), and ``moesim trace upgrade TRACE`` rewrites one without it.
A single Parquet file given as a trace (not in a ``layer=N`` folder) names its layer in a
``layer`` column.

Columns of every file:

====================  ==============================  =========================================
column                type                            meaning
====================  ==============================  =========================================
``step``              int32                           step (batch) the token belongs to
``token``             int64                           token index within the trace, the same
                                                      token in every layer
``expert_ids``        fixed_size_list<int32>[top_k]   selected experts, by descending gate weight
``gate_weights``      fixed_size_list<float32>[top_k] router weights in the same order
``sequence``          int64 (optional)                request / sequence the token belongs to
``source_device``     int32 (optional)                device the token lived on when captured
====================  ==============================  =========================================

Parquet key-value metadata (``moesim.*`` keys, JSON values) records ``model``,
``num_experts``, ``top_k``, ``layers``, ``source`` and ``capture`` settings.
Files are zstd-compressed and written to a temporary folder that is renamed into
place (:class:`moesim.fileio.OutputFolder`), so an interrupted write never leaves a half
trace behind.

Every layer holds the same tokens in the same row order, so readers can walk all
layers in lockstep. :class:`TraceWriter`, :func:`iter_batches` (every layer in lockstep)
and :func:`iter_layer_batches` (one layer after another) stream, so a trace far larger
than memory is written and read in bounded memory; :func:`read_trace` loads a whole
(small) trace into memory. Every reader applies :func:`check_layer` to each batch as it
is read.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moesim.errors import InputError
from moesim.fileio import OutputFolder

T = TypeVar("T")

__all__ = [
    "MAX_EXPERTS",
    "OPTIONAL_COLUMNS",
    "Batch",
    "RoutingTrace",
    "TraceInfo",
    "TraceWriter",
    "check_layer",
    "id_dtype",
    "iter_batches",
    "iter_layer_batches",
    "open_trace",
    "prefetch",
    "read_trace",
    "trace_schema",
    "upgrade_trace",
    "write_trace",
]

#: the most routed experts a trace may declare (2^20; the largest MoE models have hundreds)
MAX_EXPERTS = 1 << 20

OPTIONAL_COLUMNS = {"sequence": pa.int64(), "source_device": pa.int32()}
REQUIRED_COLUMNS = ("step", "token", "expert_ids", "gate_weights")


def trace_schema(
    top_k: int, optional: Sequence[str] = (), meta: dict[str, Any] | None = None
) -> pa.Schema:
    """Arrow schema of a trace file with ``top_k`` experts per token."""
    fields = [
        ("step", pa.int32()),
        ("token", pa.int64()),
        ("expert_ids", pa.list_(pa.int32(), top_k)),
        ("gate_weights", pa.list_(pa.float32(), top_k)),
    ] + [(name, OPTIONAL_COLUMNS[name]) for name in optional]
    schema = pa.schema(fields)
    if meta:
        schema = schema.with_metadata(
            {f"moesim.{k}": json.dumps(v, sort_keys=True) for k, v in meta.items()}
        )
    return schema


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

    def layer_ids(self, li: int, positions: np.ndarray) -> np.ndarray:
        """(n, K) experts of the tokens at ``positions`` (in token order) in trace layer ``li``."""
        return self.expert_ids[li, positions]

    def validate(self, source: str | Path = "<trace>") -> None:
        """Raise :class:`InputError` on ids out of range or bad gate weights."""
        for li, layer in enumerate(self.layers):
            check_layer(self.expert_ids[li], self.gate_weights[li], self.num_experts, layer, source)


def id_dtype(num_experts: int) -> type[np.integer[Any]]:
    """The smallest integer type holding expert ids 0..num_experts-1 (for ids kept in memory)."""
    if num_experts <= 1 << 8:
        return np.uint8
    return np.uint16 if num_experts <= 1 << 16 else np.int32


def _repeats_in_row(ids: np.ndarray) -> np.ndarray:
    """(N,) whether row i of the (N, K) ``ids`` holds a value twice. Up to K = 12 by
    comparing every pair of columns (K (K - 1) / 2 array compares, cheaper than sorting
    each short row: 3 ms against 12 ms for 312,500 rows of 8), beyond by sorting rows."""
    k = ids.shape[1]
    if k > 12:
        s = np.sort(ids, axis=1)
        return (s[:, 1:] == s[:, :-1]).any(axis=1)
    cols = np.ascontiguousarray(ids.T)
    twice = np.zeros(ids.shape[0], dtype=bool)
    same = np.empty_like(twice)
    for i in range(k - 1):
        for j in range(i + 1, k):
            np.equal(cols[i], cols[j], out=same)
            twice |= same
    return twice


def check_layer(
    ids: np.ndarray, weights: np.ndarray, num_experts: int, layer: int, source: str | Path
) -> None:
    """Check one layer's (N, K) ids and gate weights; raise :class:`InputError` if bad: an
    id out of range, an expert twice in one token's top-k, a weight not finite or
    negative."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        bad = (ids < 0) | (ids >= num_experts)
        ti = int(np.nonzero(bad)[0][0])
        raise InputError(
            f"expert id out of range 0..{num_experts - 1} (layer {layer}, row {ti})",
            file=source,
            field="expert_ids",
            value=int(ids[bad][0]),
        )
    if ids.ndim == 2 and ids.shape[1] > 1 and ids.size:
        twice = _repeats_in_row(ids)
        if twice.any():
            ti = int(np.flatnonzero(twice)[0])
            raise InputError(
                f"an expert twice in one token's top-k (layer {layer}, row {ti})",
                file=source,
                field="expert_ids",
                value=[int(x) for x in ids[ti]],
            )
    if weights.size and not (np.isfinite(weights).all() and weights.min() >= 0):
        badw = ~np.isfinite(weights) | (weights < 0)
        raise InputError(
            f"gate weights must be finite and non-negative (layer {layer})",
            file=source,
            field="gate_weights",
            value=float(weights[badw][0]),
        )


def _fixed_list(values: np.ndarray, width: int, dtype: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, width)


class TraceWriter:
    """Stream routing into a new trace folder, layer by layer, chunk by chunk.

    Use as a context manager; the folder appears at ``dest`` only when the block ends
    without error. A previous trace there is replaced: set aside whole by one rename, the
    new one renamed in, the old one deleted after, so a reader sees the old trace or the new
    one, never a mixture. A ``dest`` that holds anything but a trace is refused before any
    work (:class:`~moesim.errors.InputError`), never deleted; with ``force`` the trace's
    files are written into it and the rest left alone. Every layer must receive the same
    tokens in the same order::

        with TraceWriter(out, num_experts=64, top_k=6, layers=[2, 3]) as w:
            for chunk in chunks:
                for layer in (2, 3):
                    w.write(layer, ids[layer], weights[layer], token=tok, step=step)
    """

    def __init__(
        self,
        dest: str | Path,
        *,
        num_experts: int,
        top_k: int,
        layers: Sequence[int],
        meta: dict[str, Any] | None = None,
        optional_columns: Sequence[str] = (),
        force: bool = False,
    ) -> None:
        self.dest = Path(dest)
        self._out = OutputFolder(self.dest, "trace", force=force)
        self.num_experts, self.top_k = num_experts, top_k
        self.layers = tuple(int(x) for x in layers)
        i16 = np.iinfo(np.int16)
        for la in self.layers:
            if self.layers.count(la) > 1 or not i16.min <= la <= i16.max:
                why = "layer listed twice" if self.layers.count(la) > 1 else "layer beyond int16"
                raise InputError(why, field="layers", value=la)
        if not 0 < num_experts <= MAX_EXPERTS or top_k < 1:
            raise InputError(
                f"need 1..{MAX_EXPERTS} experts and top_k >= 1",
                field="num_experts" if top_k >= 1 else "top_k",
                value=num_experts if top_k >= 1 else top_k,
            )
        self.optional = tuple(optional_columns)
        unknown = [c for c in self.optional if c not in OPTIONAL_COLUMNS]
        if unknown:
            raise InputError("unknown optional column", field="optional_columns", value=unknown[0])
        meta = dict(meta or {})
        full_meta = {
            "model": meta.pop("model", ""),
            "num_experts": num_experts,
            "top_k": top_k,
            "layers": list(self.layers),
            "source": meta.pop("source", ""),
            "capture": meta.pop("capture", {}),
        } | meta
        self.schema = trace_schema(top_k, self.optional, full_meta)
        self._tmp: Path | None = None
        self._writers: dict[int, pq.ParquetWriter] = {}
        self.rows = dict.fromkeys(self.layers, 0)

    def __enter__(self) -> TraceWriter:
        self._tmp = self._out.begin()
        return self

    def write(
        self,
        layer: int,
        expert_ids: np.ndarray,
        gate_weights: np.ndarray | None = None,
        *,
        token: np.ndarray,
        step: np.ndarray | int = 0,
        **optional: np.ndarray,
    ) -> None:
        """Append rows to ``layer``: expert_ids (n, K), gate_weights (n, K) or None (1/K)."""
        if self._tmp is None:
            raise RuntimeError("TraceWriter used outside its 'with' block")
        if layer not in self.rows:
            raise InputError("layer not declared to the writer", field="layer", value=layer)
        ids = np.asarray(expert_ids)
        n = ids.shape[0]
        if ids.ndim != 2 or ids.shape[1] != self.top_k:
            raise InputError(
                f"expert_ids must be (rows, {self.top_k})", field="expert_ids", value=ids.shape
            )
        weights = (
            np.full(ids.shape, 1.0 / self.top_k, dtype=np.float32)
            if gate_weights is None
            else np.asarray(gate_weights, dtype=np.float32)
        )
        check_layer(ids, weights, self.num_experts, layer, self.dest)
        cols = [
            pa.array(np.broadcast_to(np.asarray(step, dtype=np.int32), (n,))),
            pa.array(np.asarray(token, dtype=np.int64)),
            _fixed_list(ids.astype(np.int32, copy=False), self.top_k, pa.int32()),
            _fixed_list(weights, self.top_k, pa.float32()),
        ]
        for name in self.optional:
            if name not in optional:
                raise InputError("optional column declared but not given", field=name)
            cols.append(pa.array(np.asarray(optional[name]), type=OPTIONAL_COLUMNS[name]))
        table = pa.Table.from_arrays(cols, schema=self.schema)
        try:
            if layer not in self._writers:
                part = self._tmp / f"layer={layer}"
                part.mkdir()
                self._writers[layer] = pq.ParquetWriter(
                    part / "part-0.parquet", self.schema, compression="zstd"
                )
            self._writers[layer].write_table(table)
        except OSError as err:  # a full disk, a permission lost: the old trace stays
            raise InputError(
                f"cannot write there ({err.strerror or err})", file=self.dest, field="out"
            ) from None
        self.rows[layer] += n

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp, self._tmp = self._tmp, None
        try:
            for w in self._writers.values():
                w.close()
        except OSError as err:  # a full disk on the last flush
            self._out.abort()
            if exc_type is None:
                raise InputError(
                    f"cannot write there ({err.strerror or err})", file=self.dest, field="out"
                ) from None
            return
        if exc_type is not None or tmp is None:
            self._out.abort()
            return
        counts = set(self.rows.values())
        if len(counts) != 1 or 0 in counts:
            self._out.abort()
            raise InputError(
                "every layer must receive the same, non-zero number of rows",
                file=self.dest,
                field="rows",
                value=dict(self.rows),
            )
        self._out.commit()


def write_trace(trace: RoutingTrace, dest: str | Path, *, force: bool = False) -> Path:
    """Write an in-memory trace to the folder ``dest`` (replaced atomically if it exists;
    ``force``: into a folder that holds other files, see :class:`TraceWriter`)."""
    trace.validate()
    tokens = np.arange(trace.num_tokens, dtype=np.int64)
    with TraceWriter(
        dest,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        layers=trace.layers,
        meta=trace.meta,
        force=force,
    ) as w:
        for li, layer in enumerate(trace.layers):
            w.write(
                layer, trace.expert_ids[li], trace.gate_weights[li], token=tokens, step=trace.steps
            )
    return Path(dest)


class _Meta(BaseModel):
    """The metadata every reader relies on (other ``moesim.*`` keys pass through)."""

    model_config = ConfigDict(extra="allow")
    num_experts: int = Field(strict=True, gt=0, le=MAX_EXPERTS)
    top_k: int = Field(strict=True, gt=0)


def _read_meta(schema: pa.Schema, part: Path) -> dict[str, Any]:
    """The file's ``moesim.*`` metadata, each value JSON; ``num_experts`` and ``top_k``
    positive integers."""
    raw = schema.metadata or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode(errors="replace")
        if key.startswith("moesim."):
            name = key.removeprefix("moesim.")
            try:
                out[name] = json.loads(v)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply
                text = v.decode(errors="replace")
                raise InputError(
                    "metadata value is not JSON", file=part, field=key, value=text
                ) from None
    try:
        _Meta.model_validate(out)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = f"moesim.{err['loc'][0]}" if err["loc"] else "metadata"
        value = None if err["type"] == "missing" else err.get("input")
        msg = "metadata lacks it" if err["type"] == "missing" else err["msg"]
        raise InputError(msg, file=part, field=field, value=value) from None
    return out


def _layer_of_folder(part: Path) -> int:
    """The layer a ``layer=N`` folder names."""
    name = part.parent.name.removeprefix("layer=")
    try:
        return int(name)
    except ValueError:
        raise InputError(
            "a trace folder's subfolders are named layer=N (N an integer)",
            file=part.parent,
            field="layer",
            value=name,
        ) from None


def _check_columns(schema: pa.Schema, part: Path) -> None:
    """Required columns present, of the kinds the readers cast to (ids and steps
    integers, gate weights floats), so no value is silently truncated."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise InputError("missing column", file=part, field=missing[0])
    kinds = {
        "step": pa.types.is_integer,
        "layer": pa.types.is_integer,
        "token": pa.types.is_integer,
        "expert_ids": pa.types.is_integer,
        "gate_weights": pa.types.is_floating,
    }
    for name, ok in kinds.items():
        if name not in schema.names:  # layer: in the folder name (a file may repeat it)
            continue
        t = schema.field(name).type
        value_type = t.value_type if pa.types.is_fixed_size_list(t) else t
        listed = name in ("expert_ids", "gate_weights")
        if listed != pa.types.is_fixed_size_list(t) or not ok(value_type):
            want = {"expert_ids": "fixed-size lists of integers"}.get(
                name, "fixed-size lists of floats" if name == "gate_weights" else "integers"
            )
            raise InputError(f"expected {want}", file=part, field=name, value=str(t))


@dataclass(frozen=True)
class TraceInfo:
    """An opened trace: its metadata and, per layer, its Parquet files and row count."""

    path: Path
    meta: dict[str, Any]
    files: dict[int, list[Path]]
    rows: dict[int, int]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.files))

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_tokens(self) -> int:
        return self.rows[self.layers[0]]


def open_trace(path: str | Path) -> TraceInfo:
    """Open a trace folder (or one Parquet file): check schemas and metadata, count rows."""
    path = Path(path)
    if not path.exists():
        raise InputError("trace not found", file=path)
    parts = sorted(path.glob("layer=*/*.parquet")) if path.is_dir() else [path]
    if not parts:
        raise InputError("no 'layer=N/*.parquet' files in trace folder", file=path)
    files: dict[int, list[Path]] = {}
    rows: dict[int, int] = {}
    meta: dict[str, Any] = {}
    for part in parts:
        try:
            pf = pq.ParquetFile(part)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"not a readable Parquet file ({exc})", file=part) from None
        schema = pf.schema_arrow
        _check_columns(schema, part)
        meta = meta or _read_meta(schema, part)
        width = getattr(schema.field("expert_ids").type, "list_size", None)
        if width != int(meta["top_k"]):
            raise InputError(
                f"expert_ids lists have {width} entries, metadata says top_k {meta['top_k']}",
                file=part,
                field="expert_ids",
                value=width,
            )
        if part.parent.name.startswith("layer="):
            layer = _layer_of_folder(part)
        else:  # a single file: take the layer column
            if "layer" not in schema.names:
                raise InputError(
                    "a single-file trace needs a 'layer' column (or put it in a layer=N folder)",
                    file=part,
                    field="layer",
                )
            layers = np.unique(pq.read_table(part, columns=["layer"]).column("layer").to_numpy())
            if len(layers) != 1:
                raise InputError("a single-file trace must hold one layer", file=part)
            layer = int(layers[0])
        files.setdefault(layer, []).append(part)
        rows[layer] = rows.get(layer, 0) + pf.metadata.num_rows
    if len(set(rows.values())) != 1:
        raise InputError(
            "layers hold different numbers of tokens", file=path, field="rows", value=rows
        )
    if not next(iter(rows.values())):
        raise InputError("the trace holds no tokens", file=path, field="rows", value=0)
    return TraceInfo(path=path, meta=meta, files=files, rows=rows)


@dataclass(frozen=True)
class Batch:
    """Consecutive rows of one layer: ids (n, K) int32, weights (n, K) float32, (n,) others;
    ``start``: the index of the first row within the layer."""

    layer: int
    expert_ids: np.ndarray
    gate_weights: np.ndarray
    token: np.ndarray
    step: np.ndarray
    start: int = 0


def _list_values(rb: pa.RecordBatch, name: str, width: int, dtype: type, part: Path) -> np.ndarray:
    """Column ``name``, fixed-size lists, as an (n, width) array of ``dtype``, through
    pyarrow's checked cast: a value that does not fit (an id beyond int32) is an
    :class:`InputError` naming the column, never wrapped."""
    col = rb.column(name)
    flat = col.flatten()
    if col.null_count or flat.null_count or len(flat) != len(col) * width:
        raise InputError("holds a null value", file=part, field=name)
    try:
        flat = flat.cast(pa.from_numpy_dtype(dtype))
    except pa.ArrowInvalid as exc:
        msg = " ".join(str(exc).split())
        raise InputError(
            f"does not fit {np.dtype(dtype).name} ({msg})", file=part, field=name
        ) from None
    return flat.to_numpy(zero_copy_only=False).reshape(-1, width)


def _layer_batches(info: TraceInfo, layer: int, batch_rows: int, weights: bool) -> Iterator[Batch]:
    k = info.top_k
    cols = ["token", "expert_ids", "gate_weights"] + (["step"] if weights else [])
    start = 0
    for part in info.files[layer]:
        try:
            pf = pq.ParquetFile(part)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                ids = _list_values(rb, "expert_ids", k, np.int32, part)
                w = _list_values(rb, "gate_weights", k, np.float32, part)
                check_layer(ids, w, info.num_experts, layer, part)  # weights checked always
                yield Batch(
                    layer=layer,
                    expert_ids=ids,
                    gate_weights=w if weights else np.empty((0, k), np.float32),
                    token=rb.column("token").to_numpy(),
                    step=rb.column("step").to_numpy() if weights else np.empty(0, np.int32),
                    start=start,
                )
                start += ids.shape[0]
        except (pa.ArrowInvalid, OSError) as exc:
            msg = " ".join(str(exc).split())
            raise InputError(f"not a readable trace file ({msg})", file=part) from None


def iter_batches(
    info: TraceInfo,
    layers: Sequence[int] | None = None,
    batch_rows: int | None = None,
    *,
    weights: bool = True,
) -> Iterator[dict[int, Batch]]:
    """Walk the given layers (default all) in lockstep: each item maps layer → the same
    tokens' rows in that layer. Memory stays bounded by ``batch_rows`` × layers (the
    Parquet reader's buffers included); the default, 2^19 / layers rows (at least 4,096),
    keeps that near 2^19 rows whatever the number of layers.

    With ``weights=False`` the batches carry only ids and tokens (gate weights and steps
    left empty), which is what statistics need; the gate weights are still checked, so
    every reader applies the same checks.
    """
    layers = list(info.layers if layers is None else layers)
    for layer in layers:
        if layer not in info.files:
            raise InputError("layer not in trace", file=info.path, field="layer", value=layer)
    rows = batch_rows or max(1 << 12, (1 << 19) // max(len(layers), 1))
    streams = [_layer_batches(info, layer, rows, weights) for layer in layers]
    for group in zip(*streams, strict=True):
        first = group[0]
        for b in group[1:]:
            if b.token.shape != first.token.shape or not np.array_equal(b.token, first.token):
                raise InputError(
                    "layers hold different tokens; every layer must route the same tokens",
                    file=info.path,
                    field="token",
                    value=b.layer,
                )
        yield {b.layer: b for b in group}


def iter_layer_batches(
    info: TraceInfo,
    layers: Sequence[int] | None = None,
    batch_rows: int = 1 << 16,
    *,
    weights: bool = True,
) -> Iterator[Batch]:
    """Walk the given layers (default all) one after another, each in batches of
    consecutive rows (``Batch.start`` says where a batch begins in its layer). Memory holds
    one batch and the first layer's token column (8 bytes per token), whatever the number
    of layers; every layer must hold the same tokens in the same rows as the first
    (:class:`InputError` otherwise), as :func:`iter_batches` requires.

    With ``weights=False`` only ids and tokens are decoded (gate weights and steps are
    left empty).
    """
    layers = list(info.layers if layers is None else layers)
    for layer in layers:
        if layer not in info.files:
            raise InputError("layer not in trace", file=info.path, field="layer", value=layer)
    first: np.ndarray | None = None
    for layer in layers:
        seen: list[np.ndarray] = []
        for b in _layer_batches(info, layer, batch_rows, weights):
            if first is None:
                seen.append(b.token)
            elif not np.array_equal(b.token, first[b.start : b.start + b.token.shape[0]]):
                raise InputError(
                    "layers hold different tokens; every layer must route the same tokens",
                    file=info.path,
                    field="token",
                    value=layer,
                )
            yield b
        if first is None:
            first = np.concatenate(seen) if seen else np.empty(0, np.int64)


def read_trace(path: str | Path) -> RoutingTrace:
    """Read a whole trace into memory (for the simulator), validating it."""
    info = open_trace(path)
    ids: dict[int, list[np.ndarray]] = {layer: [] for layer in info.layers}
    ws: dict[int, list[np.ndarray]] = {layer: [] for layer in info.layers}
    steps: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    for group in iter_batches(info):
        for layer, b in group.items():
            ids[layer].append(b.expert_ids)
            ws[layer].append(b.gate_weights)
        first = next(iter(group.values()))
        steps.append(first.step)
        tokens.append(first.token)
    order = np.argsort(np.concatenate(tokens), kind="stable")
    return RoutingTrace(
        expert_ids=np.stack([np.concatenate(ids[la])[order] for la in info.layers]),
        gate_weights=np.stack([np.concatenate(ws[la])[order] for la in info.layers]),
        steps=np.concatenate(steps)[order].astype(np.int32),
        layers=info.layers,
        num_experts=info.num_experts,
        meta=info.meta,
    )


def upgrade_trace(path: str | Path) -> bool:
    """Rewrite a trace written before the layer lived only in its folder names: each file
    without its ``layer`` column, everything else (rows, metadata, compression) as it was,
    swapped in whole. Returns False when there was nothing to do."""
    if not Path(path).is_dir():
        raise InputError("expected a trace folder (layer=N/*.parquet)", file=path)
    info = open_trace(path)
    parts = [p for layer in info.layers for p in info.files[layer]]
    if not any("layer" in pq.ParquetFile(p).schema_arrow.names for p in parts):
        return False
    with OutputFolder(Path(path), "trace").writing() as tmp:
        for part in parts:
            pf = pq.ParquetFile(part)
            keep = [n for n in pf.schema_arrow.names if n != "layer"]
            schema = pa.schema([pf.schema_arrow.field(n) for n in keep]).with_metadata(
                pf.schema_arrow.metadata
            )
            dest = tmp / part.relative_to(info.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with pq.ParquetWriter(dest, schema, compression="zstd") as w:
                for rb in pf.iter_batches(batch_size=1 << 16, columns=keep):
                    w.write_batch(rb)
    return True


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce ``items`` in a background thread (Parquet decoding releases the GIL), so
    decoding the next batch overlaps counting the current one."""
    q: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)

    def work() -> None:
        try:
            for item in items:
                q.put(("item", item))
            q.put(("end", None))
        except BaseException as exc:  # re-raised in the consumer
            q.put(("error", exc))

    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, payload = q.get()
        if kind == "end":
            return
        if kind == "error":
            assert isinstance(payload, BaseException)
            raise payload
        yield payload  # type: ignore[misc]
