"""A trace opens as it is in the tools users already have, with the rows moesim reads."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.traces.store import open_trace, read_trace, upgrade_trace
from moesim.traces.synthetic import synth_to_store
from tests.conftest import FLAME_TRACE, assert_one_line_error
from tests.conftest import run_moesim as moesim

COLUMNS = ["layer", "token", "step", "expert_ids", "gate_weights"]


def _moesim_rows(path) -> pd.DataFrame:
    """The trace as moesim's reader sees it: one row per (layer, token), sorted."""
    tr = read_trace(path)
    n = tr.expert_ids.shape[1]
    frames = [
        pd.DataFrame(
            {
                "layer": layer,
                "token": np.arange(n),
                "step": tr.steps,
                "expert_ids": list(map(tuple, tr.expert_ids[li].tolist())),
                "gate_weights": list(map(tuple, tr.gate_weights[li].tolist())),
            }
        )
        for li, layer in enumerate(tr.layers)
    ]
    return pd.concat(frames, ignore_index=True)


def _normal(df: pd.DataFrame) -> pd.DataFrame:
    """Another reader's rows in the same form: integer layer, tuples, sorted."""
    out = pd.DataFrame(
        {
            "layer": df["layer"].astype(str).astype(int),
            "token": df["token"].astype(int),
            "step": df["step"].astype(int),
            "expert_ids": [tuple(int(x) for x in v) for v in df["expert_ids"]],
            "gate_weights": [tuple(float(np.float32(x)) for x in v) for v in df["gate_weights"]],
        }
    )
    return out.sort_values(["layer", "token"], ignore_index=True)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("readers") / "t"
    synth_to_store(path, num_experts=16, top_k=2, num_layers=3, num_tokens=500, steps=2,
                   distribution="zipf:1.0", seed=3)  # fmt: skip
    return path


@pytest.mark.parametrize("which", ["synthetic", "flame"])
def test_pandas_pyarrow_duckdb_polars_read_the_rows_moesim_reads(trace, which):
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    path = trace if which == "synthetic" else FLAME_TRACE
    want = _normal(_moesim_rows(path))
    assert len(want) == open_trace(path).num_tokens * len(open_trace(path).layers)
    readers = {
        "pandas": lambda: pd.read_parquet(path),
        "pyarrow": lambda: ds.dataset(path, partitioning="hive").to_table().to_pandas(),
        "duckdb": lambda: duckdb.sql(
            f"SELECT * FROM read_parquet('{path}/**/*.parquet', hive_partitioning=true)"
        ).df(),
        "polars": lambda: (
            pl.scan_parquet(f"{path}/**/*.parquet", hive_partitioning=True).collect().to_pandas()
        ),
    }
    for name, read in readers.items():
        got = _normal(read()[COLUMNS])
        pd.testing.assert_frame_equal(got, want, check_dtype=False, obj=name)


def test_an_old_trace_opens_and_upgrades_to_the_same_rows(trace, tmp_path):
    """A trace of the old layout (a layer column in every file too) reads the same in
    moesim; `moesim trace upgrade` rewrites it so pandas opens it, rows unchanged."""
    old = tmp_path / "old"
    shutil.copytree(trace, old)
    for part in old.glob("layer=*/*.parquet"):
        table = pq.read_table(part)
        layer = int(part.parent.name.removeprefix("layer="))
        table = table.add_column(1, "layer", pa.array(np.full(len(table), layer, np.int16)))
        pq.write_table(table.replace_schema_metadata(pq.read_schema(part).metadata), part)
    want = _moesim_rows(trace)
    pd.testing.assert_frame_equal(_moesim_rows(old), want)
    with pytest.raises(Exception, match="layer"):
        pd.read_parquet(old)  # the old layout's int16 column against the folder key

    proc = moesim("trace", "upgrade", str(old))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"upgraded {old}"
    assert "layer" not in pq.read_schema(next(old.glob("layer=*/*.parquet"))).names
    pd.testing.assert_frame_equal(_moesim_rows(old), want)
    assert len(pd.read_parquet(old)) == len(want)
    assert open_trace(old).meta == open_trace(trace).meta
    assert upgrade_trace(old) is False  # nothing left to do


def test_a_single_file_trace_needs_its_layer_column(trace, tmp_path):
    part = next(trace.glob("layer=*/*.parquet"))
    single = tmp_path / "one.parquet"
    shutil.copy(part, single)
    proc = moesim("trace", "stats", str(single))
    assert_one_line_error(proc, "layer")
