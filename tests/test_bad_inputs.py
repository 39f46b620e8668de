"""Bad input, one row per class: every command that reads it exits 2 with one line naming
the field (and value) the user wrote, no traceback, and a previous output in --out stays
byte-identical.

Each row writes its files into a temporary folder (``{tmp}`` in the arguments), runs the
command line in-process through :func:`moesim.cli.main` and checks the one line for its
needles.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from moesim.cli import main
from moesim.paths import hardware_dir
from moesim.traces.store import RoutingTrace, write_trace

E, K, LAYERS, N = 32, 4, (0, 1, 2, 3), 256  # the moesim-reference model's routing shape

Content = str | bytes | Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]  # "{tmp}" stands for the case's folder
    needles: tuple[str, ...]  # each must be in the error line
    files: dict[str, Content] = field(default_factory=dict)


def _scenario(**changes: object) -> str:
    """A small scenario (4 devices, synthetic routing) with ``changes`` (dotted keys)."""
    data: dict = {
        "name": "bad",
        "hardware": "H100-SXM",
        "cluster": {"nodes": 1, "devices_per_node": 4},
        "model": "moesim-reference",
        "routing": {"synthetic": {"distribution": "uniform"}},
        "placement": "contiguous",
        "tokens_per_device": 64,
        "sequence_length": 128,
        "mode": "training",
    }
    for key, value in changes.items():
        node = data
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(last)
        else:
            node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


_DELETE = object()


def _raw_yaml(text: str, **changes: object) -> str:
    """The scenario with raw YAML appended (values YAML alone can spell, e.g. ``.nan``)."""
    return _scenario(**changes) + text


def _profile(section: str, key: str, value: str) -> Callable[[Path], None]:
    """H100-SXM's profile with one figure replaced by raw YAML ``value``."""

    def write(path: Path) -> None:
        data = yaml.safe_load((hardware_dir() / "H100-SXM.yaml").read_text())
        data[section][key] = "@@"
        path.write_text(yaml.safe_dump(data, sort_keys=False).replace("'@@'", value))

    return write


def _good_trace() -> RoutingTrace:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(N)]) for _ in LAYERS]).astype(
        np.int32
    )
    return RoutingTrace(
        expert_ids=ids,
        gate_weights=np.full(ids.shape, 1.0 / K, dtype=np.float32),
        steps=np.zeros(N, dtype=np.int32),
        layers=LAYERS,
        num_experts=E,
        meta={"model": "moesim-reference"},
    )


def _trace(mutate: Callable[[pa.Table], pa.Table] | None = None, *, layer: int = 0):
    """A trace folder; ``mutate`` rewrites the Parquet table of ``layer`` (-1: every layer)."""

    def write(path: Path) -> None:
        write_trace(_good_trace(), path)
        if mutate is None:
            return
        for part in sorted(path.glob("layer=*/*.parquet")):
            if layer == -1 or part.parent.name == f"layer={layer}":
                pq.write_table(mutate(pq.read_table(part)), part)

    return write


def _set_list(name: str, value_type: pa.DataType, change: Callable[[np.ndarray], None]):
    """A table mutation: column ``name`` (fixed-size lists) with its flat values changed."""

    def mutate(t: pa.Table) -> pa.Table:
        col = t.column(name).combine_chunks()
        values = col.flatten().to_numpy().astype(value_type.to_pandas_dtype())
        change(values)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(values, value_type), K)
        return t.set_column(t.schema.get_field_index(name), name, arr)

    return mutate


def _set_meta(key: str, raw: bytes):
    def mutate(t: pa.Table) -> pa.Table:
        return t.replace_schema_metadata(dict(t.schema.metadata) | {f"moesim.{key}".encode(): raw})

    return mutate


def _rename_layer(path: Path) -> None:
    _trace()(path)
    (path / "layer=0").rename(path / "layer=abc")


def _wide_ids(v: np.ndarray) -> None:
    v[1] = 2**32 + 1  # read as 1 by a wrapping cast


def _nan(v: np.ndarray) -> None:
    v[0] = np.nan


def _twice(v: np.ndarray) -> None:
    v[1] = v[0]


def _npy(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.save(path, array, allow_pickle=False)


def _npz_named_npy(path: Path) -> None:
    with path.open("wb") as fh:
        np.savez(fh, a=np.zeros((4, 2, 2), dtype=np.int64))


def _vllm_wide() -> np.ndarray:
    a = np.tile(np.array([0, 1], dtype=np.int64), (6, 2, 1))
    a[0, 0, 1] = 2**32 + 1
    return a


def _counts(table: str, meta: str = "") -> str:
    return f'{{{meta}"m": {{"expert_counts": {{"d": {table}}}}}}}'


def _kineto(**kernel: object) -> str:
    ev = {"ph": "X", "cat": "kernel", "name": "k", "ts": 10, "dur": 5, "pid": 0, "tid": 7}
    ev["args"] = {"stream": 7, "correlation": 1}
    for key, value in kernel.items():
        if key == "stream":
            ev["args"]["stream"] = value
        else:
            ev[key] = value
    return json.dumps({"traceEvents": [ev]})


TRACE_SCENARIO = _scenario(**{"routing": {"trace": "t"}})  # a trace "t" beside the file
# 4 layers x 4 devices x 9 slots for moesim-reference's 32 experts; device 0 holds 0 twice
PLACEMENT_TWICE = "num_experts: 32\nlayers:\n" + "".join(
    f"  - layer: {la}\n    devices:\n"
    + "".join(
        f"      - {[*range(8 * d, 8 * d + 8), (8 * d + 8) % 32 * (d > 0)]}\n" for d in range(4)
    )
    for la in LAYERS
)
VLLM = ["trace", "import", "{tmp}/a.npy", "--format", "vllm-npy", "--experts", "8"]
FLAME = ["trace", "import", "{tmp}/f.jsonl", "--format", "flame-jsonl", "--experts", "8"]
SYNTH = ["trace", "synth", "--experts", "8", "--top-k", "2", "--layers", "1", "--tokens", "8"]
IMPORT_COUNTS = ["trace", "import", "{tmp}/c.json", "--format", "counts-json", "--model", "m"]
IMPORT_COUNTS += ["--domain", "d", "--top-k", "1", "--out", "{tmp}/out"]

CASES = [
    # non-finite numbers, wherever a number is read
    Case(
        "scenario: jitter .inf",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("stragglers.jitter", "inf", "finite"),
        {"s.yaml": _raw_yaml("stragglers: {jitter: .inf}\n")},
    ),
    Case(
        "scenario: slow device .nan",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("stragglers.slow_devices.0", "nan"),
        {"s.yaml": _raw_yaml("stragglers: {slow_devices: {0: .nan}}\n")},
    ),
    Case(
        "scenario: capacity factor .inf",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("capacity.factor", "inf"),
        {"s.yaml": _raw_yaml("capacity: {factor: .inf}\n")},
    ),
    Case(
        "scenario: zipf:nan",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("routing.synthetic.distribution", "zipf:nan"),
        {"s.yaml": _scenario(**{"routing.synthetic.distribution": "zipf:nan"})},
    ),
    Case(
        "hardware: efficiency 1e-300",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("efficiency.gemm", "1e-300", "0.001"),
        {
            "s.yaml": _scenario(hardware="hw.yaml"),
            "hw.yaml": _profile("efficiency", "gemm", "1.0e-300"),
        },
    ),
    Case(
        "hardware: bandwidth .nan",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("scale_out.bandwidth_gbps", "nan"),
        {
            "s.yaml": _scenario(hardware="hw.yaml"),
            "hw.yaml": _profile("scale_out", "bandwidth_gbps", ".nan"),
        },
    ),
    Case(
        "trace: NaN gate weight (simulate)",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("gate_weights", "nan", "layer 0"),
        {"s.yaml": TRACE_SCENARIO, "t": _trace(_set_list("gate_weights", pa.float32(), _nan))},
    ),
    Case(
        "trace: NaN gate weight (trace stats, the same check)",
        ["trace", "stats", "{tmp}/t"],
        ("gate_weights", "nan", "layer 0"),
        {"t": _trace(_set_list("gate_weights", pa.float32(), _nan))},
    ),
    Case(
        "counts: NaN count",
        IMPORT_COUNTS,
        ("d[0].1", "nan"),
        {"c.json": _counts('[{"0": 2, "1": NaN}]')},
    ),
    Case(
        "placement: loads .nan",
        ["place", "--loads", "{tmp}/l.csv", "--nodes", "1", "--gpus-per-node", "2"],
        ("l.csv", "finite"),
        {"l.csv": "1,2,nan,4\n"},
    ),
    Case(
        "kineto: ts NaN",
        ["kernels", "import-profile", "{tmp}/k.json", "--out", "{tmp}/out.csv"],
        ("traceEvents[0].ts", "nan"),
        {"k.json": _kineto(ts=float("nan"))},
    ),
    Case(
        "kineto: stream Infinity",
        ["kernels", "import-profile", "{tmp}/k.json", "--out", "{tmp}/out.csv"],
        ("traceEvents[0].args.stream", "inf"),
        {"k.json": _kineto(stream=float("inf"))},
    ),
    Case(
        "sweep: axis value .nan",
        ["sweep", "{tmp}/w.yaml", "--out", "{tmp}/out"],
        ("capacity.factor", "nan"),
        {
            "s.yaml": _scenario(),
            "w.yaml": "name: w\nbase: s.yaml\naxes:\n  capacity.factor: [1.0, .nan]\n",
        },
    ),
    Case(
        "sweep: max_drop_rate .inf",
        ["sweep", "{tmp}/w.yaml", "--out", "{tmp}/out"],
        ("max_drop_rate", "inf"),
        {
            "s.yaml": _scenario(),
            "w.yaml": "name: w\nbase: s.yaml\nmax_drop_rate: .inf\naxes:\n  seed: [0]\n",
        },
    ),
    # integer ranges checked before any narrowing cast
    Case(
        "trace: int64 expert id 2^32+1 (not read as 1)",
        ["trace", "stats", "{tmp}/t"],
        ("expert_ids", "4294967297", "int32"),
        {"t": _trace(_set_list("expert_ids", pa.int64(), _wide_ids))},
    ),
    Case(
        "import vllm-npy: int64 expert id 2^32+1",
        [*VLLM, "--out", "{tmp}/out"],
        ("expert_ids", "4294967297"),
        {"a.npy": _npy(_vllm_wide())},
    ),
    Case(
        "import flame-jsonl: expert id 2^32+1",
        [*FLAME, "--out", "{tmp}/out"],
        ("expert_ids", "4294967297"),
        {"f.jsonl": '{"layer": 0, "token": 0, "experts": [4294967297, 0], "weights": [1, 1]}\n'},
    ),
    Case(
        "counts: float count (not truncated)",
        IMPORT_COUNTS,
        ("d[0].0", "2.7"),
        {"c.json": _counts('[{"0": 2.7, "1": 3}]')},
    ),
    Case(
        "counts: negative count",
        IMPORT_COUNTS,
        ("d[0].1", "-2", "greater than or equal to 0"),
        {"c.json": _counts('[{"0": 2, "1": -2}]')},
    ),
    Case(
        "scenario: negative seed",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("seed", "-1"),
        {"s.yaml": _scenario(seed=-1)},
    ),
    # duplicates where they make no sense
    Case(
        "trace: an expert twice in one token's top-k",
        ["trace", "stats", "{tmp}/t"],
        ("expert_ids", "twice in one token's top-k", "row 0"),
        {"t": _trace(_set_list("expert_ids", pa.int32(), _twice))},
    ),
    Case(
        "placement: an expert twice on one device",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("p.yaml", "layers[0].devices[0]", "expert 0 twice on device 0"),
        {"s.yaml": _scenario(placement="p.yaml"), "p.yaml": PLACEMENT_TWICE},
    ),
    Case(
        "counts: a key twice in one table",
        IMPORT_COUNTS,
        ("c.json", "'0'", "given twice"),
        {"c.json": _counts('[{"0": 2, "1": 2, "0": 4}]')},
    ),
    Case(
        "counts: one expert as two keys",
        IMPORT_COUNTS,
        ("d[0]", "'00'", "expert 0 listed twice"),
        {"c.json": _counts('[{"0": 2, "00": 2}]')},
    ),
    Case(
        "counts: a layer named twice",
        IMPORT_COUNTS,
        ("_meta.layers_in_expert_counts", "names a layer twice"),
        {
            "c.json": _counts(
                '[{"0": 1}, {"0": 1}]', '"_meta": {"layers_in_expert_counts": "model layer 3, 3"}, '
            )
        },
    ),
    Case(
        "import: a layer listed twice",
        [*VLLM, "--layers", "3,3", "--out", "{tmp}/out"],
        ("layers", "3", "twice"),
        {"a.npy": _npy(np.tile(np.array([0, 1], dtype=np.int64), (6, 2, 1)))},
    ),
    # one set of trace checks, for every reader
    Case(
        "trace: no tokens (not 'balanced')",
        ["trace", "stats", "{tmp}/t"],
        ("rows", "no tokens"),
        {"t": _trace(lambda t: t.slice(0, 0), layer=-1)},
    ),
    Case(
        "trace: one layer with no rows",
        ["trace", "stats", "{tmp}/t"],
        ("rows", "different numbers of tokens"),
        {"t": _trace(lambda t: t.slice(0, 0))},
    ),
    Case(
        "trace: a layer=abc folder",
        ["trace", "stats", "{tmp}/t"],
        ("layer=abc", "'abc'"),
        {"t": _rename_layer},
    ),
    Case(
        "trace: metadata not JSON",
        ["trace", "stats", "{tmp}/t"],
        ("moesim.num_experts", "not JSON"),
        {"t": _trace(_set_meta("num_experts", b"{not json"), layer=-1)},
    ),
    Case(
        "trace: num_experts zero",
        ["trace", "stats", "{tmp}/t"],
        ("moesim.num_experts", "0"),
        {"t": _trace(_set_meta("num_experts", b"0"), layer=-1)},
    ),
    Case(
        "trace: float expert ids",
        ["trace", "stats", "{tmp}/t"],
        ("expert_ids", "integers"),
        {"t": _trace(_set_list("expert_ids", pa.float64(), lambda v: None), layer=-1)},
    ),
    Case(
        "import vllm-npy: an .npz named .npy",
        [*VLLM, "--out", "{tmp}/out"],
        ("a.npy", ".npz"),
        {"a.npy": _npz_named_npy},
    ),
    Case(
        "placement loads: an .npz named .npy",
        ["place", "--loads", "{tmp}/l.npy", "--nodes", "1", "--gpus-per-node", "2"],
        ("l.npy", ".npz"),
        {"l.npy": _npz_named_npy},
    ),
    # files that are not what they claim; errors naming what the user wrote
    Case(
        "kineto: nested too deeply",
        ["kernels", "import-profile", "{tmp}/k.json", "--out", "{tmp}/out.csv"],
        ("k.json", "nested too deeply"),
        {"k.json": "[" * 100_000},
    ),
    Case(
        "scenario: a typo names the unknown field",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("hardwre", "unknown field"),
        {"s.yaml": _scenario(hardware=_DELETE) + "hardwre: H100-SXM\n"},
    ),
    Case(
        "scenario: not UTF-8",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("s.yaml", "not UTF-8"),
        {"s.yaml": b"name: \xff\xfe\n"},
    ),
    Case(
        "scenario: nested too deeply",
        ["simulate", "{tmp}/s.yaml", "--out", "{tmp}/out"],
        ("s.yaml", "nested too deeply"),
        {"s.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n"},
    ),
    # outputs that cannot be written, refused before any work
    Case(
        "sweep: --out under a file",
        ["sweep", "{tmp}/w.yaml", "--out", "{tmp}/afile/out"],
        ("out", "its folder is a file"),
        {"s.yaml": _scenario(), "w.yaml": "name: w\nbase: s.yaml\naxes:\n  seed: [0]\n"},
    ),
    Case(
        "trace synth: --out under a file",
        [*SYNTH, "--out", "{tmp}/afile/out"],
        ("out", "its folder is a file"),
    ),
    Case(
        "trace import: --out under a file",
        [*IMPORT_COUNTS[:-1], "{tmp}/afile/out"],
        ("out", "its folder is a file"),
        {"c.json": _counts('[{"0": 2, "1": 2}]')},
    ),
]


def _write_files(tmp: Path, files: dict[str, Content]) -> None:
    (tmp / "afile").write_text("a file where a folder is wanted\n")
    for name, content in files.items():
        path = tmp / name
        if isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content(path)


def _previous_output(out: Path) -> None:
    """What an earlier run left in ``out``: a trace, a CSV, or a report folder."""
    if out.parent.is_file():
        return  # the case is about that file (snapshotted as the folder's parent)
    if out.suffix == ".csv":
        out.write_text("previous,run\n1,2\n")
    elif out.name == "out" and not out.exists():
        out.mkdir()
        (out / "summary.json").write_text('{"previous": "run"}\n')


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """``moesim ARGS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["moesim", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_outputs(case, tmp_path, capsys, monkeypatch):
    _write_files(tmp_path, case.files)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if out is not None and out.parent.name == "afile":
        watched = out.parent
    elif out is not None and case.args[0] == "trace":  # a trace folder from an earlier run
        _trace()(out)
        watched = out
    elif out is not None:
        _previous_output(out)
        watched = out
    else:
        watched = tmp_path
    before = _snapshot(watched)
    code, stdout, stderr = run_cli(args, capsys, monkeypatch)
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    assert _snapshot(watched) == before


def test_every_class_of_the_requirement_has_a_row():
    """The promise as rows: non-finite numbers in each kind of file, a range checked before
    a narrowing cast, duplicates, the trace checks of every reader, named fields, unwritable
    outputs."""
    names = " | ".join(c.name for c in CASES)
    for kind in ("scenario:", "hardware:", "trace:", "counts:", "placement:", "kineto:", "sweep:"):
        assert kind in names
    for needle in ("2^32+1", "twice", "trace stats", "typo", "under a file"):
        assert needle in names


def test_the_same_files_fixed_run(tmp_path, capsys, monkeypatch):
    """The rows' good twins pass: the error is the bad value, not the harness."""
    files = {"s.yaml": TRACE_SCENARIO, "t": _trace(), "c.json": _counts('[{"0": 2, "1": 2}]')}
    _write_files(tmp_path, files)
    code, _, err = run_cli(["trace", "stats", str(tmp_path / "t")], capsys, monkeypatch)
    assert code == 0, err
    args = [a.replace("{tmp}", str(tmp_path)) for a in IMPORT_COUNTS]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    out = tmp_path / "sim"
    code, _, err = run_cli(
        ["simulate", str(tmp_path / "s.yaml"), "--out", str(out)], capsys, monkeypatch
    )
    assert code == 0, err
    assert (out / "summary.json").is_file()


def test_a_previous_trace_is_replaced_only_by_a_good_one(tmp_path, capsys, monkeypatch):
    # the harness's "previous output" for trace commands is a real trace: a good import
    # replaces it (so the byte-identical check above means the bad one touched nothing)
    _trace()(tmp_path / "out")
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    _write_files(tmp_path, {"c.json": _counts('[{"0": 2, "1": 2}]')})
    args = [a.replace("{tmp}", str(tmp_path)) for a in IMPORT_COUNTS]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    assert _snapshot(tmp_path / "out") != _snapshot(tmp_path / "copy")
