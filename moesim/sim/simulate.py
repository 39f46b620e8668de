"""Run a scenario: the pipeline's stages in order.

1. :func:`moesim.sim.prepare.prepare` loads and cross-checks the scenario's inputs;
2. :mod:`moesim.sim.replay` routes every MoE layer of each step onto the placement;
3. :func:`moesim.sim.program.build_program` turns the routing and the cost model into a
   program of ops, and :func:`moesim.sim.engine.run_program` runs it;
4. :mod:`moesim.sim.metrics` turns the engine's records into frames and a summary.

:func:`simulate` returns a :class:`SimResult` of plain data (DataFrames and dicts) that
the report and timeline writers consume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.costs.model import cost_model_for
from moesim.costs.roofline import bytes_per_assignment, layer_costs
from moesim.dispatchers import compute_slowdown
from moesim.hardware import HardwareProfile
from moesim.model.shapes import ModelShape
from moesim.placement.capacity import slot_capacity
from moesim.scenario import Scenario
from moesim.sim.engine import Op, Records, run_program
from moesim.sim.metrics import layer_frame, link_columns, metrics_frame, summary
from moesim.sim.prepare import Prepared, prepare
from moesim.sim.program import (
    apply_sm_share,
    apply_stragglers,
    build_program,
    interleave_microbatches,
)
from moesim.sim.replay import StreamedRouting
from moesim.sim.routing import (
    merge_routing,
)

__all__ = [
    "ModeResult",
    "SimResult",
    "routed_layer_steps",
    "simulate",
    "simulate_mode",
    "simulate_prepared",
]


@dataclass(frozen=True)
class ModeResult:
    """One simulated mode (training / prefill / decode).

    Attributes:
        metrics: one row per (step, pass, layer, device) of MoE and dense layers.
        layers: one row per (step, MoE layer) of the forward pass: expert, routed and
            processed balance, the straggler on the critical path with its cause and
            penalty, drops (see ``_layer_frame``).
        summary: step time, breakdown and headline figures (JSON-ready).
        program / records: the engine's input and output, for the timeline.
    """

    mode: str
    metrics: pd.DataFrame
    layers: pd.DataFrame
    summary: dict[str, Any]
    program: list[Op] = field(repr=False)
    records: list[Records] = field(repr=False)


@dataclass(frozen=True)
class SimResult:
    scenario: Scenario
    shape: ModelShape
    hw: HardwareProfile
    runs: list[ModeResult]
    inputs: dict[str, Any]


def simulate_mode(
    prep: Prepared, mode: str, progress: Callable[[int], None] | None = None
) -> ModeResult:
    """Simulate ``scenario.steps`` steps of one mode (``progress``: see
    :func:`simulate_prepared`)."""
    sc, shape, hw = prep.scenario, prep.shape, prep.hw
    n_mb = 2 if sc.overlap else 1
    tokens = sc.tokens_per_device // n_mb
    model = cost_model_for(hw)
    costs = layer_costs(
        shape,
        hw,
        tokens=tokens,
        sequence_length=sc.sequence_length,
        mode=mode,
        dtype=sc.precision,
        model=model,
    )
    d = prep.cluster.num_devices
    cap = slot_capacity(sc.capacity.factor, d * tokens * shape.top_k, prep.placement.slots[0].size)
    metrics, layers, records, step_times = [], [], [], []
    program: list[Op] = []
    flow_events = 0
    for step in range(sc.steps):
        per_mb = [StreamedRouting(prep, step, m, n_mb, progress) for m in range(n_mb)]
        programs = [
            build_program(
                shape,
                hw,
                prep.cluster,
                r,
                costs,
                mode=mode,
                tokens_per_device=tokens,
                sequence_length=sc.sequence_length,
                dtype=sc.precision,
                dispatcher=prep.dispatcher,
                model=model,
            )
            for r in per_mb
        ]
        program = programs[0] if n_mb == 1 else interleave_microbatches(programs)
        if n_mb > 1:  # compute overlaps the all-to-alls: it runs on the SMs they leave
            program = apply_sm_share(program, compute_slowdown(hw, prep.dispatcher))
        routed = {la: merge_routing([r[la] for r in per_mb]) for la in prep.moe_layers}
        st = sc.stragglers
        base_us = None  # op times before injected slowness, to tell it from load
        if st.slow_devices or st.jitter:
            base_us = np.array([op.duration_us for op in program])
            slow = np.ones(d)
            for dev, factor in st.slow_devices.items():
                slow[dev] = factor
            program = apply_stragglers(
                program, slow, st.jitter, np.random.default_rng([sc.seed, step, 0x51])
            )
        rec = run_program(program, d, prep.cluster.fabric())
        flow_events += rec.rate_updates
        m = metrics_frame(program, rec, routed, step, prep.cluster.devices_per_node, mode)
        metrics.append(m)
        disp = bytes_per_assignment(shape.d_model, prep.dispatcher.dispatch_dtype)
        wire = disp + bytes_per_assignment(shape.d_model, prep.dispatcher.combine_dtype)
        frame = layer_frame(
            routed,
            m,
            step,
            cap,
            prep.cluster.devices_per_node,
            wire,
            prep.placement.slots,
            program=program,
            rec=rec,
            base_us=base_us,
            stragglers=st,
            columns=link_columns(routed, prep.cluster.topology, disp),
            mode=mode,
        )
        layers.append(frame)
        records.append(rec)
        step_times.append(float(rec.end_us.max()))
    # one step's frames are whole already (each has its own 0..n-1 index)
    mdf = metrics[0] if len(metrics) == 1 else pd.concat(metrics, ignore_index=True)
    ldf = layers[0] if len(layers) == 1 else pd.concat(layers, ignore_index=True)
    return ModeResult(
        mode=mode,
        metrics=mdf,
        layers=ldf,
        summary=summary(prep, mode, mdf, ldf, records, program, step_times)
        | {
            "flow_events": flow_events,
            "granularity": prep.cluster.granularity if prep.cluster.network == "flow" else None,
            "layer_map": prep.scenario.routing.layer_map,
            # synthetic routing's level (token | count) and why; None for a trace
            "routing_level": None if prep.level is None else prep.level.level,
            "routing_level_reason": None if prep.level is None else prep.level.reason,
        },
        program=program,
        records=records,
    )


def simulate(scenario: Scenario, base_dir: Path, source: str | Path = "<scenario>") -> SimResult:
    """Simulate every mode the scenario asks for."""
    return simulate_prepared(prepare(scenario, base_dir, source), source)


def routed_layer_steps(prep: Prepared) -> int:
    """How many (mode, step, microbatch, MoE layer) routings a run makes: the units of
    :func:`simulate_prepared`'s ``progress``."""
    sc = prep.scenario
    return len(sc.modes) * sc.steps * (2 if sc.overlap else 1) * len(prep.moe_layers)


def simulate_prepared(
    prep: Prepared, source: str | Path = "<scenario>", progress: Callable[[int], None] | None = None
) -> SimResult:
    """Simulate every mode of a prepared scenario; ``progress(1)`` after each layer is
    routed (:func:`routed_layer_steps` in all)."""
    scenario = prep.scenario
    runs = [simulate_mode(prep, mode, progress) for mode in scenario.modes]
    return SimResult(
        scenario=scenario,
        shape=prep.shape,
        hw=prep.hw,
        runs=runs,
        inputs={
            "trace_tokens": prep.trace.num_tokens if prep.trace is not None else None,
            "trace_layers": list(prep.trace.layers)
            if prep.trace is not None
            else list(range(len(prep.moe_layers))),
            "moe_layers": prep.moe_layers,
            "source": str(source),
            "dispatcher": prep.dispatcher.name,
            "dedup": prep.dispatcher.dedup,
            "routing_level": None if prep.level is None else str(prep.level),
        },
    )
