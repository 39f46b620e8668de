"""The sweep results folder: sweep.yaml, sweep.json, results.parquet and timings.parquet.

The format is a contract with the report writer::

    DIR/sweep.yaml        the sweep spec as given (copied on the first run)
    DIR/sweep.json        {"sweep_id", "cases", "created_by": "moesim sweep", "max_drop_rate"}
    DIR/results.parquet   one row per finished case (ok or error), sorted by case_index
    DIR/timings.parquet   (case_id, elapsed_s): wall time per case

``results.parquet`` is rewritten whole (to a temporary name, then renamed) as soon as cases
finish (every case finished since the last write goes into the next one), rows already there
kept as they are, sorted by case_index: a killed sweep loses no finished case, and the table
is byte-identical whichever executor ran the cases and in whatever order they finished.
An axis column holds the case's value at that dotted path (JSON text when not a scalar); an
axis that is also an input column (``hardware``, ``model``, ``mode``, ``tokens_per_device``)
shares that column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moesim.errors import InputError
from moesim.fileio import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    clean_stray_temporaries,
    is_temporary,
)
from moesim.sweep.spec import Case, Sweep

__all__ = [
    "INPUT_COLUMNS",
    "METRIC_COLUMNS",
    "CaseResult",
    "ResultsFolder",
    "case_inputs",
    "metric_values",
    "results_schema",
]

CREATED_BY = "moesim sweep"

#: the case's inputs, always present (from its scenario, so error rows have them too)
INPUT_COLUMNS: dict[str, pa.DataType] = {
    "hardware": pa.string(),
    "model": pa.string(),
    "mode": pa.string(),
    "num_devices": pa.int64(),
    "nodes": pa.int64(),
    "devices_per_node": pa.int64(),
    "tokens_per_device": pa.int64(),
    "capacity_factor": pa.float64(),
}

#: headline figures of the simulation (float64; null for error rows or when not provided)
METRIC_COLUMNS = (
    "step_time_us",
    "expert_us",
    "dispatch_us",
    "combine_us",
    "other_us",
    "allreduce_us",
    "wait_us",
    "overlapped_us",
    "tokens_per_s",
    "routed_balance",
    "routed_balance_mean",
    "processed_balance",
    "drop_rate",
    "straggler_penalty",
    "cross_node_bytes",
    "memory_per_device_bytes",
)

_HEAD: dict[str, pa.DataType] = {
    "case_id": pa.string(),
    "case_index": pa.int32(),
    "status": pa.string(),
    "error": pa.string(),
    "axes": pa.string(),
}

_TIMINGS = pa.schema([("case_id", pa.string()), ("elapsed_s", pa.float64())])


@dataclass(frozen=True)
class CaseResult:
    """What a worker sends back for one case.

    Attributes:
        row: one results.parquet row (column -> value), without the axis columns.
        elapsed_s: wall time of the case on its worker.
    """

    case_id: str
    row: dict[str, Any]
    elapsed_s: float


def case_inputs(scenario: dict[str, Any]) -> dict[str, Any]:
    """The always-present input columns of a case, from its JSON-ready scenario."""
    cluster = scenario["cluster"]
    model = scenario["model"]
    factor = scenario["capacity"]["factor"]
    return {
        "hardware": str(scenario["hardware"]),
        "model": model if isinstance(model, str) else str(model.get("name")),
        "mode": scenario["mode"],
        "num_devices": int(cluster["nodes"]) * int(cluster["devices_per_node"]),
        "nodes": int(cluster["nodes"]),
        "devices_per_node": int(cluster["devices_per_node"]),
        "tokens_per_device": int(scenario["tokens_per_device"]),
        "capacity_factor": None if factor is None else float(factor),
    }


def _number(value: Any, reduce: str = "max") -> float | None:
    """A summary figure as float64: lists (one entry per layer) reduced by max or mean."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if not value:
            return None
        vals = [float(v) for v in value]
        return max(vals) if reduce == "max" else math.fsum(vals) / len(vals)
    return float(value)


def metric_values(summary: dict[str, Any]) -> dict[str, float | None]:
    """Map a run's summary (``ModeResult.summary``) onto the metric columns.

    A column is looked up at the summary's top level, then in its ``breakdown_us``;
    per-layer lists give their max (``routed_balance``, ``processed_balance``,
    ``straggler_penalty``) and ``routed_balance_mean`` the mean of ``routed_balance``.
    Figures the summary lacks are null.
    """
    breakdown = summary.get("breakdown_us") or {}
    out: dict[str, float | None] = {}
    for col in METRIC_COLUMNS:
        if col == "routed_balance_mean":
            out[col] = _number(summary.get("routed_balance"), reduce="mean")
        elif col in summary:
            out[col] = _number(summary[col])
        else:
            out[col] = _number(breakdown.get(col))
    return out


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _axis_type(values: list[Any]) -> pa.DataType:
    """One Arrow type for an axis column, from every value it will hold."""
    present = [v for v in values if v is not None]
    if not all(_is_scalar(v) for v in present):
        return pa.string()  # JSON-encoded
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if any(isinstance(v, bool) for v in present):
        return pa.string()
    if present and all(isinstance(v, int) for v in present):
        return pa.int64()
    if present and all(isinstance(v, int | float) for v in present):
        return pa.float64()
    if all(isinstance(v, str) for v in present):
        return pa.string()
    return pa.string()


def _get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _axis_value(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if kind == pa.string() and not isinstance(value, str):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if kind == pa.float64():
        return float(value)
    return value


def results_schema(sweep: Sweep) -> tuple[pa.Schema, dict[str, pa.DataType]]:
    """The results table's schema for ``sweep`` and the types of its own axis columns.

    An axis whose path is also an input column (``hardware``, ``model``, ``mode``,
    ``tokens_per_device``) shares that column.
    """
    axis_types = {
        col: _axis_type([_get_path(c.scenario, col) for c in sweep.cases])
        for col in sweep.columns
        if col not in INPUT_COLUMNS and col not in _HEAD and col not in METRIC_COLUMNS
    }
    fields = [
        *_HEAD.items(),
        *axis_types.items(),
        *INPUT_COLUMNS.items(),
        *((c, pa.float64()) for c in METRIC_COLUMNS),
    ]
    return pa.schema(fields), axis_types


class ResultsFolder:
    """A sweep's results folder, opened for one run of that sweep.

    Opening checks that the folder belongs to this sweep (or is new) and can be written, and
    reads the rows already there, writing nothing; a folder holding other files is refused
    unless ``force`` (then the sweep's files are written beside them). :meth:`create` writes
    the sweep's files into a new folder; :meth:`add` appends finished cases and rewrites
    both tables atomically.
    """

    def __init__(self, folder: Path, sweep: Sweep, *, force: bool = False) -> None:
        self.folder = folder
        self.sweep = sweep
        self.force = force
        self.schema, self._axis_types = results_schema(sweep)
        self._by_id = {c.case_id: c for c in sweep.cases}
        self.rows: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}
        self._open()

    @property
    def results_path(self) -> Path:
        return self.folder / "results.parquet"

    @property
    def timings_path(self) -> Path:
        return self.folder / "timings.parquet"

    def _open(self) -> None:
        folder, sweep = self.folder, self.sweep
        check_writable(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError("not a folder", file=folder, field="out")
        meta_path = folder / "sweep.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                other = meta["sweep_id"]
            except (ValueError, KeyError, TypeError):
                raise InputError(
                    "not a sweep results folder (unreadable sweep.json)", file=meta_path
                ) from None
            if meta.get("created_by") != CREATED_BY or other != sweep.sweep_id:
                raise InputError(
                    f"results folder from another sweep (this sweep is {sweep.sweep_id[:16]}); "
                    "use a new --out folder",
                    file=meta_path,
                    field="sweep_id",
                    value=str(other)[:16],
                )
        elif self.results_path.exists():
            raise InputError(
                "results folder from another sweep (results.parquet without sweep.json); "
                "use a new --out folder",
                file=self.results_path,
            )
        elif folder.is_dir() and not self.force:
            # a new sweep writes into an empty folder (or a killed first run's)
            other = sorted(
                p.name
                for p in folder.iterdir()
                if p.name != "sweep.yaml" and not is_temporary(p.name)
            )
            if other:
                raise InputError(
                    f"not a sweep results folder (it holds {', '.join(other[:3])}"
                    f"{', ...' if len(other) > 3 else ''}); use a new --out folder, or "
                    "--force to write the sweep's files beside them",
                    file=folder,
                )
        if self.results_path.exists():
            self._read_existing()

    def create(self) -> None:
        """Write sweep.yaml and sweep.json into a new folder; clear a killed run's temporaries."""
        folder, sweep = self.folder, self.sweep
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot write there ({exc.strerror or exc})", file=folder) from None
        clean_stray_temporaries(folder)
        if not (folder / "sweep.json").exists():
            atomic_write_bytes(folder / "sweep.yaml", sweep.path.read_bytes())
            meta = {
                "sweep_id": sweep.sweep_id,
                "cases": len(sweep.cases),
                "created_by": CREATED_BY,
                "max_drop_rate": sweep.spec.max_drop_rate,
            }
            atomic_write_text(folder / "sweep.json", json.dumps(meta, indent=2) + "\n")

    def _read_existing(self) -> None:
        try:
            table = pq.read_table(self.results_path)
        except (OSError, pa.ArrowException) as err:
            raise InputError(
                f"cannot read results.parquet: {err}", file=self.results_path
            ) from None
        if not table.schema.equals(self.schema, check_metadata=False):
            raise InputError(
                "results folder from another sweep (results.parquet has other columns); "
                "use a new --out folder",
                file=self.results_path,
            )
        for row in table.to_pylist():
            if row["case_id"] not in self._by_id:
                raise InputError(
                    "results folder from another sweep (a case this sweep does not have)",
                    file=self.results_path,
                    field="case_id",
                    value=row["case_id"],
                )
            self.rows[row["case_id"]] = row
        if self.timings_path.exists():
            try:
                for t in pq.read_table(self.timings_path).to_pylist():
                    self.timings[t["case_id"]] = t["elapsed_s"]
            except (OSError, pa.ArrowException, KeyError):
                self.timings = {}  # only wall times; they are rebuilt from new cases

    def pending(self) -> list[Case]:
        """The cases not yet in the results table, in expansion order."""
        return [c for c in self.sweep.cases if c.case_id not in self.rows]

    def full_row(self, case: Case, row: dict[str, Any]) -> dict[str, Any]:
        """A worker's row completed with the case's index, axes and axis columns."""
        out = dict(row)
        out["case_index"] = case.index
        out["axes"] = json.dumps(case.overrides, sort_keys=True, separators=(",", ":"))
        for col, kind in self._axis_types.items():
            out[col] = _axis_value(_get_path(case.scenario, col), kind)
        return {name: out.get(name) for name in self.schema.names}

    def add(self, results: list[CaseResult]) -> list[dict[str, Any]]:
        """Record finished cases (rows already there stay as they are) and rewrite
        results.parquet, then timings.parquet; returns each case's row."""
        out = []
        for result in results:
            if result.case_id not in self.rows:
                self.rows[result.case_id] = self.full_row(self._by_id[result.case_id], result.row)
                self.timings[result.case_id] = result.elapsed_s
            out.append(self.rows[result.case_id])
        if results:
            self._write()
        return out

    def table(self) -> pa.Table:
        """The results rows, sorted by case_index."""
        rows = sorted(self.rows.values(), key=lambda r: r["case_index"])
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: r["case_index"])
        table = pa.Table.from_pylist(rows, schema=self.schema)
        atomic_write(self.results_path, lambda p: pq.write_table(table, p))
        timings = pa.Table.from_pylist(
            [
                {"case_id": r["case_id"], "elapsed_s": self.timings[r["case_id"]]}
                for r in rows
                if r["case_id"] in self.timings
            ],
            schema=_TIMINGS,
        )
        atomic_write(self.timings_path, lambda p: pq.write_table(timings, p))
