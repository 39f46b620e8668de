"""Sweep files: a base scenario plus axes (a grid or a zip) or an explicit list of cases.

Example (``scenarios/sweeps/example.yaml``)::

    name: example
    base: ../demo.yaml                 # a scenario file (relative to this file) or a mapping
    axes:                              # dotted scenario field path -> values
      capacity.factor: [1.0, 1.25, 2.0]
      cluster.nodes: [1, 2]
    grid: true                         # true: every combination; false: the i-th values
                                       # of each axis together (one-value axes go with all)
    cases:                             # optional explicit overrides (crossed with the axes)
      - {hardware: H100-SXM}
      - {hardware: B200, capacity.overflow: reroute}
    max_drop_rate: 0.001               # drop budget of the report's best answers (default
                                       # 0: only cases that drop nothing can be best)

Field paths are generic: any :class:`~moesim.scenario.Scenario` field, nested by dots, so
fields added to the scenario later can be swept without changes here. Each case's scenario
(the base with its overrides) is validated by the scenario model, and a case whose scenario
lists several modes becomes one case per mode (``mode`` then counts as one of its axes).
Relative paths in the overrides resolve where the base's own do: against the base file's
folder, or the sweep file's for an inline base.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moesim.errors import InputError
from moesim.scenario import Scenario

__all__ = [
    "Case",
    "Sweep",
    "SweepSpec",
    "canonical_json",
    "case_id",
    "expand_cases",
    "load_sweep",
    "set_path",
]


class SweepSpec(BaseModel):
    """What a sweep file holds (validated before any case is built)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = "sweep"
    base: Path | dict[str, Any] = Field(
        description="a scenario file (relative to the sweep file) or an inline scenario mapping"
    )
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted scenario field path -> values"
    )
    grid: bool = Field(
        default=True,
        description="true: every combination of axis values; false: the i-th values of every "
        "axis together (axes of one value go with every case)",
    )
    cases: list[dict[str, Any]] | None = Field(
        default=None, description="explicit overrides {path: value}, crossed with the axes"
    )
    max_drop_rate: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="drop budget: the report's best answers keep to cases dropping at most "
        "this share of assignments (0: dropless cases only)",
    )


@dataclass(frozen=True)
class Case:
    """One simulation of a sweep: a scenario with exactly one mode.

    Attributes:
        index: position in the sweep's expansion order.
        case_id: :func:`case_id` of ``scenario``.
        overrides: {dotted path: value} this case sets on the base (axes and explicit case;
            ``mode`` too when the case is one of the modes its scenario lists).
        scenario: the case's full scenario, as a JSON-ready mapping (``model_dump(mode="json")``).
    """

    index: int
    case_id: str
    overrides: dict[str, Any]
    scenario: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: its spec, expanded cases and where relative paths start.

    Attributes:
        path: the sweep file.
        sweep_id: sha256 of the canonical sweep spec (base resolved to its mapping).
        columns: the dotted paths swept (axes first, then explicit cases' paths), in order.
        base_dir: folder the cases' relative paths resolve against.
    """

    path: Path
    spec: SweepSpec
    sweep_id: str
    cases: list[Case]
    columns: list[str]
    base_dir: Path


def canonical_json(data: Any) -> str:
    """Sorted keys, no whitespace: the same mapping always gives the same text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def case_id(scenario: Scenario) -> str:
    """First 16 hex digits of sha256 of the canonical JSON of the full scenario."""
    text = canonical_json(scenario.model_dump(mode="json"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def set_path(data: dict[str, Any], path: str, value: Any, *, file: Path) -> None:
    """Set ``data[a][b][c] = value`` for ``path = "a.b.c"``, creating missing mappings.

    Raises:
        InputError: an empty path segment, or a segment that is not a mapping in ``data``.
    """
    parts = path.split(".")
    if not all(parts):
        raise InputError("not a dotted field path", file=file, field=path, value=value)
    node = data
    for i, key in enumerate(parts[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise InputError(
                f"'{where}' holds {child!r}, not a mapping, so '{path}' cannot be set",
                file=file,
                field=path,
                value=value,
            )
        node = child
    node[parts[-1]] = copy.deepcopy(value)


#: cases a sweep may expand to unless ``moesim sweep --max-cases`` says otherwise
DEFAULT_MAX_CASES = 10_000


def _combinations(
    spec: SweepSpec, file: Path, max_cases: int = DEFAULT_MAX_CASES
) -> list[dict[str, Any]]:
    """Every case's overrides, in expansion order: explicit cases (outer) x axes (inner).
    More than ``max_cases`` is refused before any is built."""
    for path, values in spec.axes.items():
        if not values:
            raise InputError("axis has no values", file=file, field=f"axes.{path}", value=values)
    sizes = [len(v) for v in spec.axes.values()]
    per_case = math.prod(sizes) if spec.grid else max(sizes, default=1)
    total = per_case * (len(spec.cases) if spec.cases else 1)
    if total > max_cases:
        raise InputError(
            f"expands to {total:,} cases, more than --max-cases {max_cases:,}",
            file=file,
            field="axes" if spec.axes else "cases",
            value=total,
        )
    if spec.cases is not None and not spec.cases:
        raise InputError("no cases listed", file=file, field="cases", value=[])
    if not spec.axes and spec.cases is None:
        raise InputError("give 'axes' or 'cases' (or both)", file=file, field="axes")
    paths = list(spec.axes)
    if spec.grid:
        points = [
            dict(zip(paths, combo, strict=True)) for combo in itertools.product(*spec.axes.values())
        ]
    else:
        # zip: the i-th values of every axis together; a one-value axis goes with all
        n = max((len(v) for v in spec.axes.values()), default=0)
        longest = next((p for p, v in spec.axes.items() if len(v) == n), "")
        for p, v in spec.axes.items():
            if len(v) not in (1, n):
                raise InputError(
                    f"grid: false pairs the i-th values of every axis, but '{longest}' has "
                    f"{n} values and this axis {len(v)}",
                    file=file,
                    field=f"axes.{p}",
                    value=v,
                )
        points = [
            {p: v[i] if len(v) > 1 else v[0] for p, v in spec.axes.items()} for i in range(n)
        ] or [{}]
    explicit = spec.cases if spec.cases is not None else [{}]
    out = []
    for i, case in enumerate(explicit):
        for path in case:
            if path in spec.axes:
                raise InputError(
                    "this path is both an axis and set by an explicit case",
                    file=file,
                    field=f"cases[{i}].{path}",
                    value=case[path],
                )
        for point in points:
            out.append({**case, **point})
    _check_overlaps([*paths, *(p for c in explicit for p in c)], file)
    return out


def _check_overlaps(paths: list[str], file: Path) -> None:
    """Refuse paths where one is a prefix of another (``capacity`` and ``capacity.factor``)."""
    unique = sorted(set(paths))
    for a, b in itertools.pairwise(unique):
        if b.startswith(a + "."):
            raise InputError(f"overlaps the swept path '{a}'", file=file, field=b)


def _case_error(exc: ValidationError, overrides: dict[str, Any], file: Path) -> InputError:
    """The first validation error, naming the swept path (and its value) that caused it."""
    from moesim.yamlio import validation_to_input_error

    err = validation_to_input_error(exc, file)
    loc = ".".join(str(p) for p in exc.errors()[0]["loc"])
    for path, value in overrides.items():
        if path == loc or path.startswith(loc + ".") or loc.startswith(path + "."):
            return InputError(err.message, file=file, field=path, value=value)
    return err


def _validate(data: dict[str, Any], overrides: dict[str, Any], file: Path) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise _case_error(exc, overrides, file) from None


def expand_cases(
    spec: SweepSpec, base: dict[str, Any], file: Path, max_cases: int = DEFAULT_MAX_CASES
) -> tuple[list[Case], list[str]]:
    """The sweep's cases in order, and the swept paths (the results table's axis columns).

    Args:
        spec: the sweep spec.
        base: the base scenario mapping (as read, before validation: the axes may supply
            fields it lacks).
        file: the sweep file, named in errors.

    Raises:
        InputError: an empty axis, an unknown field, a value the scenario model refuses,
            or two cases that give the same scenario.
    """
    columns = list(spec.axes)
    for case in spec.cases or []:
        columns += [p for p in case if p not in columns]
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for overrides in _combinations(spec, file, max_cases):
        data = copy.deepcopy(base)
        for path, value in overrides.items():
            set_path(data, path, value, file=file)
        scenario = _validate(data, overrides, file)
        for mode in scenario.modes:
            one, swept = scenario, overrides
            if isinstance(scenario.mode, list):  # one case per mode: mode becomes an axis
                swept = {**overrides, "mode": mode}
                one = _validate({**data, "mode": mode}, overrides, file)
            cid = case_id(one)
            if cid in seen:
                raise InputError(
                    f"case {len(cases)} gives the same scenario as case {seen[cid]}",
                    file=file,
                    field="axes" if spec.axes else "cases",
                    value=overrides,
                )
            seen[cid] = len(cases)
            if len(cases) == max_cases:  # a list of modes multiplies the combinations
                raise InputError(
                    f"expands to more than --max-cases {max_cases:,} cases (one per mode)",
                    file=file,
                    field="mode",
                    value=scenario.modes,
                )
            cases.append(Case(len(cases), cid, swept, one.model_dump(mode="json")))
            if swept is not overrides and "mode" not in columns:
                columns.append("mode")
    return cases, columns


def load_sweep(path: str | Path, max_cases: int = DEFAULT_MAX_CASES) -> Sweep:
    """Read a sweep file, load its base scenario and expand its cases.

    Raises:
        InputError: the file, its base or any case is not valid (one line naming the
            file, field and value).
    """
    from moesim.yamlio import load_yaml, validation_to_input_error

    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise InputError("expected a mapping at the top level", file=path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise validation_to_input_error(exc, path) from None
    if isinstance(spec.base, Path):
        base_file = spec.base if spec.base.is_absolute() else path.resolve().parent / spec.base
        base = load_yaml(base_file)
        if not isinstance(base, dict):
            raise InputError("expected a mapping at the top level", file=base_file)
        base_dir = base_file.resolve().parent
    else:
        base, base_dir = dict(spec.base), path.resolve().parent
    cases, columns = expand_cases(spec, base, path, max_cases)
    canonical = spec.model_dump(mode="json") | {"base": base}
    if not spec.max_drop_rate:  # the default budget leaves earlier sweeps' ids unchanged
        del canonical["max_drop_rate"]
    sweep_id = hashlib.sha256(canonical_json(canonical).encode("utf-8")).hexdigest()
    return Sweep(path, spec, sweep_id, cases, columns, base_dir)
