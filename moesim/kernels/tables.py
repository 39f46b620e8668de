"""Measured kernel timing tables: one folder per device, one CSV per op, plus ``meta.json``.

Layout (see ``kernels/README.md``)::

    kernels/measured/<device-slug>/<op>.csv
    kernels/measured/<device-slug>/meta.json

Every CSV has the columns of :data:`TABLE_COLUMNS`; :func:`load_table` validates them
and raises :class:`~moesim.errors.InputError` naming the file, the column and the
offending value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.errors import InputError
from moesim.fileio import atomic_write, atomic_write_text

__all__ = [
    "INT_COLUMNS",
    "KEY_COLUMNS",
    "REQUIRED_COLUMNS",
    "TABLE_COLUMNS",
    "TIME_COLUMNS",
    "device_slug",
    "load_table",
    "merge_rows",
    "thread_count",
    "write_meta",
    "write_op_table",
]

TABLE_COLUMNS: tuple[str, ...] = (
    "op",
    "model",
    "dtype",
    "tokens",
    "d_model",
    "d_ff",
    "num_experts",
    "top_k",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "v_head_dim",
    "flops",
    "bytes",
    "median_us",
    "p10_us",
    "p90_us",
    "min_us",
    "repeats",
    "rounds",
    "warmup",
    "threads",
    "torch_version",
    "device",
)
"""Columns of a measured table, in file order (``rounds`` is absent from tables older
than multi-round measurement)."""

REQUIRED_COLUMNS: tuple[str, ...] = (
    "op",
    "dtype",
    "tokens",
    "d_model",
    "d_ff",
    "num_experts",
    "top_k",
    "median_us",
    "p10_us",
    "p90_us",
    "repeats",
    "threads",
    "torch_version",
    "device",
)
"""Columns :func:`load_table` requires (the others are read when present)."""

INT_COLUMNS: tuple[str, ...] = (
    "tokens",
    "d_model",
    "d_ff",
    "num_experts",
    "top_k",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "v_head_dim",
    "repeats",
    "rounds",
    "warmup",
    "threads",
)
"""Non-negative integer columns."""

TIME_COLUMNS: tuple[str, ...] = ("median_us", "p10_us", "p90_us", "min_us")
"""Times in µs: finite and non-negative."""

_FLOAT_COLUMNS: tuple[str, ...] = (*TIME_COLUMNS, "flops", "bytes")

KEY_COLUMNS: tuple[str, ...] = (*TABLE_COLUMNS[: TABLE_COLUMNS.index("flops")], "threads")
"""A row's identity: a new measurement with the same key replaces the old one."""


def device_slug(name: str) -> str:
    """Folder name for a device: lower case, runs of other characters become ``-``.

    ``"NVIDIA H100 80GB HBM3"`` → ``"nvidia-h100-80gb-hbm3"``.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def _csv_path(device_dir: Path, op: str) -> Path:
    return device_dir / f"{op}.csv"


def merge_rows(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` rows whose key (:data:`KEY_COLUMNS`) is not in ``new``, then ``new``; sorted."""
    frames = [new]
    if old is not None and len(old):
        keys = [c for c in KEY_COLUMNS if c in old.columns and c in new.columns]
        new_keys = set(map(tuple, new[keys].astype(str).to_numpy().tolist()))
        keep = [tuple(row) not in new_keys for row in old[keys].astype(str).to_numpy().tolist()]
        frames.insert(0, old[keep])
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else new.copy()
    out = out.reindex(columns=list(TABLE_COLUMNS))
    out["rounds"] = out["rounds"].fillna(1).astype("int64")  # older rows: one sitting
    sort = [c for c in ("model", "dtype", "d_model", "d_ff", "num_experts", "tokens") if c in out]
    return out.sort_values(sort, kind="stable").reset_index(drop=True)


def write_op_table(device_dir: str | Path, op: str, rows: pd.DataFrame) -> Path:
    """Write (merge into) ``<device_dir>/<op>.csv`` atomically.

    Rows already in the file with a key not measured again are kept; same-key rows are
    replaced by the new measurement.
    """
    device_dir = Path(device_dir)
    path = _csv_path(device_dir, op)
    old = _validate(_read_csv(path), path) if path.is_file() else None
    table = merge_rows(old, rows)

    def write(tmp: Path) -> None:
        table.to_csv(tmp, index=False, float_format="%.6g")

    return atomic_write(path, write)


def write_meta(device_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``<device_dir>/meta.json`` atomically."""
    return atomic_write_text(
        Path(device_dir) / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n"
    )


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, keep_default_na=False, dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        msg = " ".join(str(err).split())
        raise InputError(f"not a readable CSV table: {msg}", file=path) from None
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", file=path) from None


def _validate(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Check columns and values; return the table with numeric columns converted."""
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise InputError(
                f"missing column; a table needs {', '.join(REQUIRED_COLUMNS)}",
                file=path,
                field=col,
                value="(missing)",
            )
    out = df.reset_index(drop=True)
    for col in (*INT_COLUMNS, *_FLOAT_COLUMNS):
        if col not in out.columns:
            continue
        raw = out[col]
        num = pd.to_numeric(raw, errors="coerce")
        for i, (text, val) in enumerate(zip(raw.tolist(), num.tolist(), strict=True)):
            row = f"row {i + 2}"  # 1-based, after the header line
            if val is None or not math.isfinite(float(val)):
                raise InputError(f"{row}: not a finite number", file=path, field=col, value=text)
            if float(val) < 0:
                raise InputError(f"{row}: negative", file=path, field=col, value=text)
            if col in INT_COLUMNS and float(val) != int(float(val)):
                raise InputError(f"{row}: not an integer", file=path, field=col, value=text)
        out[col] = num.astype("int64") if col in INT_COLUMNS else num.astype("float64")
    order = (out["p10_us"] > out["median_us"]) | (out["median_us"] > out["p90_us"])
    bad = np.flatnonzero(order.to_numpy())
    if len(bad):
        i = int(bad[0])
        raise InputError(
            f"row {i + 2}: needs p10_us <= median_us <= p90_us",
            file=path,
            field="median_us",
            value=float(out["median_us"].iloc[i]),
        )
    ops = set(out["op"].tolist())
    if ops and ops != {path.stem}:
        other = sorted(ops - {path.stem})[0]
        raise InputError(
            f"every row of {path.name} must have op '{path.stem}'",
            file=path,
            field="op",
            value=other,
        )
    return out


def load_table(device_dir: str | Path, ops: Sequence[str] | None = None) -> pd.DataFrame:
    """All measured rows of one device folder (every ``*.csv``, or only ``ops``), validated.

    Integer columns come back as int64, times/flops/bytes as float64. Raises
    :class:`~moesim.errors.InputError` for a missing folder or file, a missing column, a
    non-numeric, non-finite or negative value, percentiles out of order, or a row whose
    ``op`` differs from its file's name.
    """
    device_dir = Path(device_dir)
    if not device_dir.is_dir():
        raise InputError("no such kernel-table folder", file=device_dir)
    if ops is None:
        paths = sorted(device_dir.glob("*.csv"))
        if not paths:
            raise InputError("no <op>.csv tables in the folder", file=device_dir)
    else:
        paths = [_csv_path(device_dir, op) for op in ops]
        for p in paths:
            if not p.is_file():
                raise InputError("table not found", file=p)
    frames = [_validate(_read_csv(p), p) for p in paths]
    return pd.concat(frames, ignore_index=True)


def thread_count(table: pd.DataFrame, file: str | Path | None = None) -> int | None:
    """The one thread count a table's rows were measured with (``None`` without a
    ``threads`` column). Raises :class:`~moesim.errors.InputError` (naming ``file``) if the
    table mixes thread counts: one device folder must describe one configuration, so merge
    runs with the same ``--threads``."""
    if "threads" not in table.columns:
        return None
    counts = sorted(int(x) for x in table["threads"].unique())
    if len(counts) > 1:
        raise InputError(
            "the table mixes runs with different thread counts; keep one",
            file=file,
            field="threads",
            value=", ".join(map(str, counts)),
        )
    return counts[0] if counts else None
