"""Property tests: a valid scenario, trace, placement, counts JSON and Kineto trace, mutated
at random (values replaced by NaN, infinities, huge or negative integers, strings, lists,
nulls; keys deleted and added; Parquet columns retyped and rewritten), is either read or
refused with :class:`~moesim.errors.InputError`, never another exception.

The default run tries a few dozen mutations per file kind; ``-m slow`` runs many more.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.kernels.profile_import import import_profile
from moesim.placement.io import read_placement
from moesim.scenario import load_scenario
from moesim.traces.importers import import_counts_json, load_counts_json
from moesim.traces.stats import trace_stats
from moesim.traces.store import RoutingTrace, read_trace, write_trace
from tests.test_profile_import import synthetic_trace

FAST, DEEP = 40, 1000  # examples per file kind: default run, slow run

# ----- mutations of a JSON-like tree ------------------------------------------------------------
ODD_NUMBERS = [0, -1, 1, 2**31, -(2**31) - 1, 2**32 + 1, 2**63, 2**64 + 1, 10**30, 1e-300, 1e300]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*ODD_NUMBERS, float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into ``node`` (dict keys and list indices), the root included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _mutate(tree: Any, data: st.DataObject, max_changes: int = 3) -> Any:
    """``tree`` with 1..max_changes random changes: a value replaced (by anything, or by a
    small integer), a container emptied, a key or list entry deleted, a key added, a list
    entry repeated."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.integers(1, max_changes), label="changes")):
        action = data.draw(
            st.sampled_from(["replace", "small", "empty", "delete", "add", "repeat"]),
            label="action",
        )
        paths = list(_paths(tree))
        if action == "empty":  # only where the action changes something
            paths = [p for p in paths if p and isinstance(_at(tree, p), dict | list)]
        elif action == "add":
            paths = [p for p in paths if p and isinstance(_at(tree, p[:-1]), dict)]
        elif action == "repeat":
            paths = [p for p in paths if p and isinstance(_at(tree, p[:-1]), list)]
        if not paths:
            continue
        path = data.draw(st.sampled_from(paths), label="path")
        if not path:
            if action == "replace":
                tree = data.draw(VALUES, label="root")
            continue
        parent, last = _at(tree, path[:-1]), path[-1]
        if action == "replace":
            parent[last] = data.draw(VALUES, label="value")
        elif action == "small":  # a plausible integer, so the checks past the types run
            parent[last] = data.draw(st.integers(-2, 9), label="value")
        elif action == "empty":
            parent[last] = type(parent[last])()
        elif action == "delete":
            del parent[last]
        elif action == "add":
            parent[data.draw(st.text(max_size=8), label="key")] = data.draw(VALUES, label="value")
        elif action == "repeat":
            parent.append(copy.deepcopy(parent[last]))
    return tree


def _accepts_or_input_error(read: Callable[[], object]) -> None:
    with suppress(InputError):
        read()


@contextmanager
def _folder() -> Iterator[Path]:
    # a fresh folder per example (hypothesis reuses a test's function-scoped fixtures)
    with tempfile.TemporaryDirectory(prefix="moesim-fuzz-") as tmp:
        yield Path(tmp)


def _fuzz(max_examples: int) -> Callable:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=max_examples == FAST,  # the default run is the same every time
    )


# ----- the valid files ------------------------------------------------------------------------
SCENARIO = {
    "name": "fuzz",
    "hardware": "H100-SXM",
    "cluster": {"nodes": 1, "devices_per_node": 4},
    "model": "moesim-reference",
    "routing": {"synthetic": {"distribution": "zipf:1.2", "seed": 3}},
    "placement": "greedy",
    "redundant_slots": 4,
    "capacity": {"factor": 1.25, "overflow": "drop"},
    "network": {"tier": "flow", "oversubscription": 2.0},
    "stragglers": {"slow_devices": {1: 1.5}, "jitter": 0.1, "degraded_nics": {2: 0.5}},
    "mode": ["training", "prefill"],
    "tokens_per_device": 64,
    "sequence_length": 128,
    "dispatcher": {"preset": "deepep-normal"},
    "steps": 2,
    "seed": 0,
}
PLACEMENT = {
    "num_experts": 4,
    "nodes": 1,
    "devices_per_node": 2,
    "layers": [
        {"layer": 0, "devices": [[0, 1, 2], [3, 0, 1]]},
        {"layer": 1, "devices": {0: [0, 2, 3], 1: [1, 3, 2]}},
    ],
}
COUNTS = {
    "_meta": {"layers_in_expert_counts": "model layer 3, 5"},
    "m": {"expert_counts": {"d": [{"0": 3, "1": 1, "2": 2}, {"0": 2, "1": 2, "2": 2}]}},
}
E, K, N = 8, 2, 16


def _small_trace() -> RoutingTrace:
    rng = np.random.default_rng(1)
    ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(N)]) for _ in range(2)])
    return RoutingTrace(
        expert_ids=ids.astype(np.int32),
        gate_weights=np.full(ids.shape, 0.5, dtype=np.float32),
        steps=np.zeros(N, dtype=np.int32),
        layers=(3, 5),
        num_experts=E,
    )


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory) -> Path:
    return write_trace(_small_trace(), tmp_path_factory.mktemp("fuzz") / "trace")


# ----- one example per file kind ------------------------------------------------------------------
def _scenario_example(data: st.DataObject) -> None:
    tree = _mutate(SCENARIO, data)
    with _folder() as tmp:
        path = tmp / "s.yaml"
        text = yaml.safe_dump(tree, sort_keys=False)
        if data.draw(st.booleans(), label="raw text edit"):  # and now and then the text itself
            at = data.draw(st.integers(0, len(text)), label="at")
            text = text[:at] + data.draw(st.text(max_size=6), label="insert") + text[at:]
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _accepts_or_input_error(lambda: load_scenario(path))


INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint32(), pa.uint64(), pa.float64()]
FLOAT_TYPES = [pa.float16(), pa.float32(), pa.float64(), pa.int64()]


def _column_values(data: st.DataObject, n: int, value_type: pa.DataType) -> pa.Array:
    """``n`` values of ``value_type``: some drawn at random, the rest small and plausible."""
    if pa.types.is_floating(value_type):
        elems = st.floats(
            allow_nan=True, allow_infinity=True, width=16 if value_type == pa.float16() else 64
        )
        base = np.full(n, 0.5)
    else:
        info = np.iinfo(value_type.to_pandas_dtype())
        elems = st.integers(int(info.min), int(info.max)) | st.integers(
            max(-2, int(info.min)), 2 * E
        )
        base = np.arange(n) % E
    values = base.astype(value_type.to_pandas_dtype()).tolist()
    for i in data.draw(st.lists(st.integers(0, n - 1), max_size=4), label="positions"):
        values[i] = data.draw(elems, label="value")
    if data.draw(st.booleans(), label="a null"):
        values[data.draw(st.integers(0, n - 1), label="null at")] = None
    return pa.array(values, type=value_type)


def _mutate_table(t: pa.Table, data: st.DataObject) -> pa.Table:
    action = data.draw(
        st.sampled_from(["ids", "weights", "drop", "slice", "meta", "scalar column"]),
        label="table change",
    )
    if action in ("ids", "weights"):
        name = "expert_ids" if action == "ids" else "gate_weights"
        value_type = data.draw(st.sampled_from(INT_TYPES if action == "ids" else FLOAT_TYPES))
        width = data.draw(st.sampled_from([K, K, 1, K + 1]), label="width")
        flat = _column_values(data, t.num_rows * width, value_type)
        arr = pa.FixedSizeListArray.from_arrays(flat, width)
        return t.set_column(t.schema.get_field_index(name), name, arr)
    if action == "drop":
        return t.drop_columns([data.draw(st.sampled_from(t.column_names), label="column")])
    if action == "slice":
        start = data.draw(st.integers(0, t.num_rows), label="start")
        return t.slice(start, data.draw(st.integers(0, t.num_rows), label="length"))
    if action == "meta":
        key = data.draw(st.sampled_from(["num_experts", "top_k", "layers", "model"]), label="key")
        raw = data.draw(
            st.binary(max_size=8) | VALUES.map(lambda v: json.dumps(v).encode()), label="raw"
        )
        return t.replace_schema_metadata(dict(t.schema.metadata) | {f"moesim.{key}".encode(): raw})
    name = data.draw(st.sampled_from(["step", "token"]), label="column")
    value_type = data.draw(st.sampled_from([pa.int8(), pa.int64(), pa.float64(), pa.string()]))
    values = [str(i) if value_type == pa.string() else i for i in range(t.num_rows)]
    if data.draw(st.booleans(), label="a null") and values:
        values[0] = None
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values, type=value_type))


def _trace_example(data: st.DataObject, good: Path) -> None:
    with _folder() as tmp:
        path = tmp / "t"
        shutil.copytree(good, path)
        parts = sorted(path.glob("layer=*/*.parquet"))
        for part in data.draw(
            st.lists(st.sampled_from(parts), min_size=1, max_size=2, unique=True)
        ):
            pq.write_table(_mutate_table(pq.read_table(part), data), part)
        if data.draw(st.integers(0, 9), label="rename a layer folder") == 0:
            name = data.draw(st.sampled_from(["layer=x", "layer=", "layer=99999", "layer=-1"]))
            parts[0].parent.rename(path / name)
        _accepts_or_input_error(lambda: read_trace(path))
        _accepts_or_input_error(lambda: trace_stats(path, top=2))


def _placement_example(data: st.DataObject) -> None:
    tree = _mutate(PLACEMENT, data)
    constrained = data.draw(st.booleans(), label="cluster given")
    with _folder() as tmp:
        path = tmp / "p.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        kw = (
            dict(num_experts=4, num_layers=2, num_devices=2, devices_per_node=2)
            if constrained
            else {}
        )
        _accepts_or_input_error(lambda: read_placement(path, **kw))


def _counts_example(data: st.DataObject) -> None:
    tree = _mutate(COUNTS, data)
    with _folder() as tmp:
        path = tmp / "c.json"
        path.write_text(json.dumps(tree))  # NaN and Infinity written as JSON's extensions
        _accepts_or_input_error(lambda: load_counts_json(path))
        top_k = data.draw(st.integers(1, 3), label="top_k")
        _accepts_or_input_error(
            lambda: import_counts_json(path, tmp / "t", model="m", domain="d", top_k=top_k)
        )


KINETO = synthetic_trace()


def _kineto_example(data: st.DataObject) -> None:
    tree = _mutate(KINETO, data, max_changes=4)
    with _folder() as tmp:
        path = tmp / "k.json"
        path.write_text(json.dumps(tree))
        _accepts_or_input_error(lambda: import_profile(path))


# ----- the default run (bounded) and the deep run (slow) -----------------------------------------
@_fuzz(FAST)
@given(st.data())
def test_fuzz_scenario(data):
    _scenario_example(data)


@_fuzz(FAST)
@given(st.data())
def test_fuzz_trace(good_trace, data):
    _trace_example(data, good_trace)


@_fuzz(FAST)
@given(st.data())
def test_fuzz_placement(data):
    _placement_example(data)


@_fuzz(FAST)
@given(st.data())
def test_fuzz_counts_json(data):
    _counts_example(data)


@_fuzz(FAST)
@given(st.data())
def test_fuzz_kineto(data):
    _kineto_example(data)


@pytest.mark.slow
@_fuzz(DEEP)
@given(st.data())
def test_fuzz_scenario_deep(data):
    _scenario_example(data)


@pytest.mark.slow
@_fuzz(DEEP)
@given(st.data())
def test_fuzz_trace_deep(good_trace, data):
    _trace_example(data, good_trace)


@pytest.mark.slow
@_fuzz(DEEP)
@given(st.data())
def test_fuzz_placement_deep(data):
    _placement_example(data)


@pytest.mark.slow
@_fuzz(DEEP)
@given(st.data())
def test_fuzz_counts_json_deep(data):
    _counts_example(data)


@pytest.mark.slow
@_fuzz(DEEP)
@given(st.data())
def test_fuzz_kineto_deep(data):
    _kineto_example(data)


def test_the_valid_files_are_read():
    """Unmutated, every file kind is read: the fuzz starts from valid input."""
    with _folder() as tmp:
        (tmp / "s.yaml").write_text(yaml.safe_dump(SCENARIO))
        assert load_scenario(tmp / "s.yaml")[0].stragglers.slow_devices == {1: 1.5}
        (tmp / "p.yaml").write_text(yaml.safe_dump(PLACEMENT))
        p, names = read_placement(tmp / "p.yaml", num_experts=4, num_layers=2, num_devices=2)
        assert p.slots[1].tolist() == [[0, 2, 3], [1, 3, 2]] and names == [0, 1]
        (tmp / "c.json").write_text(json.dumps(COUNTS))
        layers, counts = load_counts_json(tmp / "c.json")
        assert layers == [3, 5] and counts.tolist() == [[3, 1, 2], [2, 2, 2]]
        (tmp / "k.json").write_text(json.dumps(KINETO))
        assert import_profile(tmp / "k.json").num_kernels == 5
        write_trace(_small_trace(), tmp / "t")
        assert read_trace(tmp / "t").expert_ids.shape == (2, N, K)
