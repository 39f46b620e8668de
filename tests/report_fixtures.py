"""A small sweep results folder, written the way ``moesim sweep`` writes one
(the contract: results.parquet sorted by case_index, one row per case), from real
``simulate`` runs of a small model on synthetic routing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.scenario import Scenario
from moesim.sim.simulate import simulate
from moesim.sweep.results import METRIC_COLUMNS

NODES = (1, 2)
FACTORS: tuple[float | None, ...] = (None, 1.0, 1.25, 2.0)  # None: dropless
METRICS = METRIC_COLUMNS


def _scenario(nodes: int, factor: float | None) -> Scenario:
    return Scenario(
        name="fixture",
        hardware="H100-SXM",
        cluster={"nodes": nodes, "devices_per_node": 8},
        model="moesim-reference",
        routing={"synthetic": {"distribution": "zipf:1.0"}},
        capacity={"factor": factor},
        mode="prefill",
        tokens_per_device=256,
        sequence_length=256,
        seed=0,
        # capacity-limited MoE as GShard-style stacks run it: every (token, expert) copy
        # over NCCL's all-to-all-v, so dropped copies are copies not sent
        dispatcher="nccl-alltoallv",
    )


def write_sweep_fixture(
    folder: Path, with_error: bool = True, max_drop_rate: float | None = None
) -> Path:
    """results.parquet (and sweep.json, with ``max_drop_rate`` when given) for a grid
    nodes × capacity factor (dropless and three factors)."""
    rows = []
    for nodes in NODES:
        for factor in FACTORS:
            sc = _scenario(nodes, factor)
            s = simulate(sc, folder).runs[0].summary
            b = s["breakdown_us"]
            metrics = {
                k: float(s[k]) if k in s and not isinstance(s[k], list) else b.get(k)
                for k in METRICS
            }
            metrics["routed_balance"] = float(np.max(s["routed_balance"]))
            metrics["routed_balance_mean"] = float(np.mean(s["routed_balance"]))
            metrics["processed_balance"] = float(np.max(s["processed_balance"]))
            metrics["straggler_penalty"] = float(np.max(s["straggler_penalty"]))
            rows.append(
                {
                    "case_id": hashlib.sha256(sc.model_dump_json().encode()).hexdigest()[:16],
                    "case_index": len(rows),
                    "status": "ok",
                    "error": None,
                    "axes": json.dumps({"cluster.nodes": nodes, "capacity.factor": factor}),
                    "cluster.nodes": nodes,
                    "capacity.factor": factor,
                    "hardware": "H100-SXM",
                    "model": s["model"],
                    "mode": s["mode"],
                    "num_devices": s["devices"],
                    "nodes": nodes,
                    "devices_per_node": 8,
                    "tokens_per_device": 256,
                    "capacity_factor": factor,
                    **metrics,
                }
            )
    if with_error:
        rows.append(
            rows[-1]
            | {
                "case_id": "0" * 16,
                "case_index": len(rows),
                "status": "error",
                "error": "contiguous placement needs experts (32) to be a multiple of devices",
                "axes": json.dumps({"cluster.nodes": 3, "capacity.factor": 1.0}),
                "cluster.nodes": 3,
                "capacity.factor": 1.0,
                "nodes": 3,
                "num_devices": 24,
                **dict.fromkeys(METRICS),
            }
        )
    schema = pa.schema(
        [
            ("case_id", pa.string()),
            ("case_index", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("axes", pa.string()),
            ("cluster.nodes", pa.int64()),
            ("capacity.factor", pa.float64()),
            ("hardware", pa.string()),
            ("model", pa.string()),
            ("mode", pa.string()),
            ("num_devices", pa.int64()),
            ("nodes", pa.int64()),
            ("devices_per_node", pa.int64()),
            ("tokens_per_device", pa.int64()),
            ("capacity_factor", pa.float64()),
            *((m, pa.float64()) for m in METRICS),
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "results.parquet")
    meta = {"sweep_id": "f" * 64, "cases": len(rows), "created_by": "moesim sweep"}
    if max_drop_rate is not None:
        meta["max_drop_rate"] = max_drop_rate
    (folder / "sweep.json").write_text(json.dumps(meta))
    return folder
