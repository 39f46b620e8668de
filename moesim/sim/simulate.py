"""Run a scenario: load its parts, route every MoE layer, build the program, run the engine.

:func:`simulate` returns a :class:`SimResult` of plain data (DataFrames and dicts) that
the metrics, report and timeline writers consume.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.balance import balance_ratio
from moesim.costs.memory import memory_per_device
from moesim.costs.model import cost_model_for
from moesim.costs.roofline import bytes_per_assignment, layer_costs
from moesim.errors import InputError
from moesim.hardware import HardwareProfile, get_profile
from moesim.model.shapes import ModelShape, get_preset
from moesim.placement.base import Placement, contiguous
from moesim.placement.capacity import slot_capacity
from moesim.scenario import Scenario, Stragglers
from moesim.sim.counts import draw_counts, inclusion_probabilities, route_counts
from moesim.sim.engine import Exchange, Op, Records, run_program
from moesim.sim.program import (
    ClusterSpec,
    apply_stragglers,
    build_program,
    interleave_microbatches,
)
from moesim.sim.routing import (
    LayerRouting,
    busiest_flow,
    cross_node_total,
    merge_routing,
    route_layer,
)
from moesim.sim.stragglers import layer_straggler, straggler_penalty
from moesim.topology import build_topology
from moesim.topology.build import Topology
from moesim.traces.store import RoutingTrace, read_trace
from moesim.traces.synthetic import Popularity, parse_distribution, synthesize

__all__ = ["ModeResult", "SimResult", "prepare", "simulate", "simulate_mode"]


@dataclass(frozen=True)
class Prepared:
    """A scenario's inputs, loaded and checked against each other."""

    scenario: Scenario
    shape: ModelShape
    hw: HardwareProfile
    trace: RoutingTrace | None  # None: count-level synthetic routing from ``popularity``
    placement: Placement
    cluster: ClusterSpec
    moe_layers: list[int]  # model layer index of each trace layer, in order
    popularity: Popularity | None = None


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


def prepare(scenario: Scenario, base_dir: Path, source: str | Path = "<scenario>") -> Prepared:
    """Load the hardware, model, routing and placement a scenario names, and cross-check them."""
    try:
        hw_name = scenario.hardware
        if hw_name.endswith((".yaml", ".yml")) and not Path(hw_name).is_absolute():
            hw_name = str(base_dir / hw_name)  # a profile file next to the scenario
        hw = get_profile(hw_name)
        shape = get_preset(scenario.model) if isinstance(scenario.model, str) else scenario.model
    except InputError as err:
        if err.file is not None:
            raise
        raise InputError(err.message, file=source, field=err.field, value=err.value) from None
    moe_layers = shape.moe_layer_indices()
    syn = scenario.routing.synthetic
    seed = scenario.seed if syn is None or syn.seed is None else syn.seed
    trace: RoutingTrace | None = None
    if scenario.routing.trace is not None:
        tpath = scenario.routing.trace
        tpath = tpath if tpath.is_absolute() else base_dir / tpath
        try:
            trace = read_trace(tpath)
        except InputError as err:
            if err.file is None or err.message in ("trace not found", "file not found"):
                raise InputError(
                    err.message,
                    file=source,
                    field="routing.trace",
                    value=str(scenario.routing.trace),
                ) from None
            raise
        if trace.num_experts != shape.num_experts:
            raise InputError(
                f"trace has {trace.num_experts} experts, model {shape.name} has "
                f"{shape.num_experts}",
                file=tpath,
                field="num_experts",
                value=trace.num_experts,
            )
        if trace.top_k != shape.top_k:
            raise InputError(
                f"trace routes top-{trace.top_k}, model {shape.name} top-{shape.top_k}",
                file=tpath,
                field="top_k",
                value=trace.top_k,
            )
        if len(trace.layers) != len(moe_layers):
            raise InputError(
                f"trace has {len(trace.layers)} MoE layers, model {shape.name} has "
                f"{len(moe_layers)}",
                file=tpath,
                field="layers",
                value=len(trace.layers),
            )
    popularity = None
    if syn is not None and syn.level == "count":
        for field_name, value, ok in (
            ("capacity.overflow", scenario.capacity.overflow, "drop"),
            ("network.dedup", scenario.network.dedup, "none"),
        ):
            if value != ok:
                raise InputError(
                    f"count-level routing supports {field_name} {ok} only",
                    file=source,
                    field=field_name,
                    value=value,
                )
        popularity = Popularity(
            parse_distribution(syn.distribution), shape.num_experts, len(moe_layers), seed
        )
    elif syn is not None:
        trace = synthesize(
            num_experts=shape.num_experts,
            top_k=shape.top_k,
            num_layers=len(moe_layers),
            num_tokens=scenario.cluster.num_devices * scenario.tokens_per_device * scenario.steps,
            distribution=syn.distribution,
            seed=seed,
        )
    cl = scenario.cluster
    try:
        placement = _placement(scenario, shape, hw, trace, popularity, len(moe_layers), base_dir)
    except InputError as err:
        if err.file is not None:
            raise
        raise InputError(
            err.message, file=source, field="placement", value=scenario.placement
        ) from None
    in_file = placement.num_devices * placement.slots.shape[2] - shape.num_experts
    if scenario.redundant_slots and scenario.redundant_slots != in_file:
        raise InputError(  # a placement file brings its own redundancy (0: take the file's)
            f"placement {scenario.placement} has {in_file} redundant slots per layer",
            file=source,
            field="redundant_slots",
            value=scenario.redundant_slots,
        )
    net = scenario.network
    try:
        topology = build_topology(
            hw,
            cl.num_devices,
            cl.devices_per_node,
            oversubscription=net.oversubscription,
            nodes_per_leaf=net.nodes_per_leaf,
        )
    except InputError as err:
        raise InputError(
            err.message, file=source, field=f"network.{err.field}", value=err.value
        ) from None
    bad = [
        x
        for x in (*scenario.stragglers.slow_devices, *scenario.stragglers.degraded_nics)
        if x >= cl.num_devices
    ]
    if bad:
        raise InputError(
            f"device out of range 0..{cl.num_devices - 1}",
            file=source,
            field="stragglers",
            value=bad[0],
        )
    topology = topology.degrade_nics(scenario.stragglers.degraded_nics)
    cluster = ClusterSpec(
        num_devices=cl.num_devices,
        devices_per_node=cl.devices_per_node,
        topology=topology,
        network=net.tier,
        flow_rel_tol=net.flow_rel_tol,
    )
    return Prepared(scenario, shape, hw, trace, placement, cluster, moe_layers, popularity)


def _placement(
    scenario: Scenario,
    shape: ModelShape,
    hw: HardwareProfile,
    trace: RoutingTrace | None,
    popularity: Popularity | None,
    num_layers: int,
    base: Path,
) -> Placement:
    """The scenario's placement: contiguous, a planner run on the routing's own loads, or a
    placement file checked against the model, cluster and device memory."""
    from moesim.placement.io import read_placement
    from moesim.placement.memory import max_expert_slots
    from moesim.placement.planners import STRATEGIES, plan

    cl, name = scenario.cluster, scenario.placement
    e = shape.num_experts
    if name == "contiguous" and scenario.redundant_slots == 0:
        return contiguous(e, cl.num_devices, num_layers)
    mem = max_expert_slots(shape, hw, scenario.precision)
    if name in STRATEGIES:
        co = cross = None
        if trace is None:  # count-level routing: plan from the expected loads of step 0
            assert popularity is not None
            if name == "affinity":
                raise InputError(
                    "the affinity planner needs per-token routing (a trace, or level: token)",
                    field="placement",
                    value=name,
                )
            loads = np.stack(
                [
                    inclusion_probabilities(popularity(la, 0), shape.top_k)
                    for la in range(num_layers)
                ]
            )
        else:
            ids = trace.expert_ids  # (L, N, K)
            key = np.arange(num_layers)[:, None] * e + ids.reshape(num_layers, -1)
            loads = np.bincount(key.ravel(), minlength=num_layers * e).reshape(num_layers, e)
        if name == "affinity":
            assert trace is not None
            ids = trace.expert_ids
            from moesim.placement.affinity import coactivation

            co, cross = coactivation(ids, e)
        return plan(
            loads,
            name,
            nodes=cl.nodes,
            devices_per_node=cl.devices_per_node,
            redundant=scenario.redundant_slots,
            max_slots_per_device=mem,
            coactivation=co,
            cross_layer=cross,
        )
    path = Path(name) if Path(name).is_absolute() else base / name
    placement, _ = read_placement(
        path,
        num_experts=e,
        num_layers=num_layers,
        num_devices=cl.num_devices,
        max_slots_per_device=mem,
        devices_per_node=cl.devices_per_node,
    )
    return placement


def step_tokens(trace: RoutingTrace, step: int, count: int) -> np.ndarray:
    """Indices of the ``count`` trace tokens replayed at ``step`` (the trace repeats cyclically)."""
    return (step * count + np.arange(count)) % trace.num_tokens


def route_step(
    prep: Prepared, step: int, microbatch: int = 0, microbatches: int = 1
) -> dict[int, LayerRouting]:
    """Route every MoE layer of one step (or of one of its microbatches: each device's
    tokens split into ``microbatches`` equal parts); keyed by model layer index."""
    return {
        layer: route_layer_at(prep, step, li, microbatch, microbatches)
        for li, layer in enumerate(prep.moe_layers)
    }


def route_layer_at(
    prep: Prepared, step: int, li: int, microbatch: int = 0, microbatches: int = 1
) -> LayerRouting:
    """Route MoE layer ``li`` (its index among the MoE layers) of one step or microbatch."""
    sc, shape, d = prep.scenario, prep.shape, prep.cluster.num_devices
    per_dev = sc.tokens_per_device
    mb = per_dev // microbatches
    cap = slot_capacity(sc.capacity.factor, d * mb * shape.top_k, prep.placement.slots[li].size)
    table, nrep = prep.placement.replicas(li)
    if prep.trace is None:  # count level (``routing.synthetic.level: count``)
        assert prep.popularity is not None
        pi = inclusion_probabilities(prep.popularity(li, step), shape.top_k)
        rng = np.random.default_rng([prep.popularity.seed, 0xC0417, step, li, microbatch])
        return route_counts(
            draw_counts(pi, mb, d, shape.top_k, rng),
            prep.placement.slots[li],
            table,
            nrep,
            devices_per_node=prep.cluster.devices_per_node,
            capacity=cap,
            replica_choice=sc.replica_choice,
        )
    idx = step_tokens(prep.trace, step, d * per_dev)
    pos = (np.arange(d)[:, None] * per_dev + microbatch * mb + np.arange(mb)[None, :]).ravel()
    origin = (np.arange(d * mb) // mb).astype(np.int32)
    return route_layer(
        prep.trace.expert_ids[li, idx[pos]],
        origin,
        prep.placement.slots[li],
        table,
        nrep,
        num_experts=shape.num_experts,
        devices_per_node=prep.cluster.devices_per_node,
        capacity=cap,
        overflow=sc.capacity.overflow,
        dedup=sc.network.dedup,
        replica_choice=sc.replica_choice,
    )


class _StreamedRouting(Mapping[int, LayerRouting]):
    """One step's (or microbatch's) routing, routed layer by layer as the program builder
    asks for it. The builder gets the full routing of a layer; what stays behind is its
    compact form (no (D, D) matrices), so memory holds one layer's traffic at a time."""

    def __init__(self, prep: Prepared, step: int, microbatch: int, microbatches: int) -> None:
        self.prep, self.step, self.mb, self.n_mb = prep, step, microbatch, microbatches
        self.index = {layer: li for li, layer in enumerate(prep.moe_layers)}
        self.kept: dict[int, LayerRouting] = {}

    def __getitem__(self, layer: int) -> LayerRouting:
        if layer in self.kept:
            return self.kept[layer]
        full = route_layer_at(self.prep, self.step, self.index[layer], self.mb, self.n_mb)
        cl = self.prep.cluster
        self.kept[layer] = full.compact(cl.devices_per_node, cl.topology)
        return full

    def __iter__(self) -> Iterator[int]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, layer: object) -> bool:
        return layer in self.index


def _metrics_frame(
    program: list[Op],
    rec: Records,
    routed: dict[int, LayerRouting],
    step: int,
    devices_per_node: int,
) -> pd.DataFrame:
    """One row per (pass, layer, device): time per category, wait, bytes, loads (routed:
    before capacity; device: processed, after drops)."""
    n_dev = rec.start_us.shape[1]
    rows: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    cats = ("expert_us", "dispatch_us", "combine_us", "other_us", "allreduce_us")
    for i, op in enumerate(program):
        key = (op.pass_, op.layer)
        r = rows.setdefault(
            key,
            {c: np.zeros(n_dev) for c in (*cats, "wait_us", "bytes_sent", "bytes_recv")}
            | {"start_us": rec.start_us[i] - rec.wait_us[i], "end_us": rec.end_us[i]},
        )
        r[f"{op.category}_us"] += rec.duration_us[i]
        r["wait_us"] += rec.wait_us[i]
        r["end_us"] = rec.end_us[i]
        if isinstance(op, Exchange) and op.sent_bytes.size:
            r["bytes_sent"] += op.sent_bytes
            r["bytes_recv"] += op.recv_bytes
    parts: dict[str, list[np.ndarray]] = {}
    dev = np.arange(n_dev)
    for (pass_, layer), cols in rows.items():
        lr = routed.get(layer)
        frame = {
            "step": np.full(n_dev, step),
            "pass": np.full(n_dev, pass_, dtype=object),
            "layer": np.full(n_dev, layer),
            "device": dev,
            "node": dev // devices_per_node,
            "routed_load": lr.routed_load
            if lr is not None and lr.routed_load is not None
            else np.zeros(n_dev, np.int64),
            "device_load": lr.device_load if lr is not None else np.zeros(n_dev, np.int64),
            "dropped": lr.dropped if lr is not None else np.zeros(n_dev, np.int64),
            **cols,
        }
        for name, col in frame.items():
            parts.setdefault(name, []).append(np.asarray(col))
    # one frame from whole columns: far faster than a frame per (pass, layer) and a concat
    return pd.DataFrame({name: np.concatenate(cols) for name, cols in parts.items()})


def _layer_frame(
    routed: dict[int, LayerRouting],
    metrics: pd.DataFrame,
    step: int,
    cap: int | None,
    devices_per_node: int,
    wire_bytes: float,
    slots: np.ndarray | None = None,
    *,
    program: list[Op],
    rec: Records,
    base_us: np.ndarray | None = None,
    stragglers: Stragglers | None = None,
) -> pd.DataFrame:
    """Per MoE layer (forward): balance before and after capacity, the straggler on the
    critical path with its cause and penalty, drops, traffic, and what lies behind the
    straggler (see :func:`_attribution`).

    Balance (:mod:`moesim.balance`): ``expert_balance`` (logical experts, before
    capacity), ``routed_balance`` (devices, before capacity), ``processed_balance``
    (devices, after drops), and ``dropless_capacity_factor``, the smallest capacity factor
    that drops nothing. Straggler (:mod:`moesim.sim.stragglers`): ``straggler_device``,
    ``straggler_cause``, ``straggler_phase`` and ``straggler_penalty`` of that phase
    ((max − mean) / mean of per-device time in it).

    ``wire_bytes``: bytes of one assignment's dispatch plus its combine; ``slots``: (L, D, S)
    experts hosted per device, per MoE layer (the placement); ``program`` / ``rec``: the
    step's ops and records; ``base_us``: (num_ops, D) op times before injected slowness.
    """
    st = stragglers or Stragglers()
    out = []
    fwd = metrics[(metrics["pass"] == "forward") & (metrics["step"] == step)]
    layer_ops: dict[int, list[int]] = {}
    for i, op in enumerate(program):
        if op.pass_ == "forward" and op.layer in routed:
            layer_ops.setdefault(op.layer, []).append(i)
    for li, (layer, lr) in enumerate(routed.items()):
        m = fwd[fwd["layer"] == layer].sort_values("device")
        load = lr.device_load
        assert lr.expert_load is not None and lr.routed_load is not None
        cross = lr.cross_node_copies
        if cross is None:
            assert lr.copies is not None
            cross = cross_node_total(lr.copies, devices_per_node)
        hosted = None if slots is None else slots[li]
        strag = layer_straggler(
            program,
            rec,
            layer_ops[layer],
            base_us=base_us,
            slow_devices=st.slow_devices,
            jitter=st.jitter,
            degraded_nics=st.degraded_nics,
        )
        out.append(
            {
                "step": step,
                "layer": layer,
                "expert_balance": balance_ratio(lr.expert_load),
                "routed_balance": balance_ratio(lr.routed_load),
                "processed_balance": balance_ratio(load),
                "dropless_capacity_factor": float(lr.dropless_capacity_factor),
                "straggler_device": strag.device,
                "straggler_cause": strag.cause,
                "straggler_phase": strag.phase,
                "straggler_penalty": straggler_penalty(m[f"{strag.phase}_us"].to_numpy()),
                "straggler_op": program[strag.op].name if strag.op >= 0 else "",
                "straggler_excess_us": strag.excess_us,
                "last_device": strag.gate_device,
                "max_device_load": int(load.max()),
                "mean_device_load": float(load.mean()),
                "dropped": int(lr.dropped.sum()),
                "rerouted": lr.rerouted,
                "assignments": lr.assignments,
                "drop_rate": float(lr.dropped.sum() / lr.assignments),
                "slot_capacity": cap,
                "cross_node_copies": int(cross),
                "cross_node_bytes": float(cross * wire_bytes),
            }
            | _attribution(lr, hosted, strag.device, wire_bytes)
        )
    return pd.DataFrame(out)


def _attribution(
    lr: LayerRouting, slots: np.ndarray | None, straggler: int, wire_bytes: float
) -> dict[str, Any]:
    """The straggler's most loaded expert and the busiest flow of one layer step.

    ``slots``: (D, S) experts hosted per device. The busiest flow is the (src, dst) pair
    with the most dispatched token copies; its bytes are that dispatch plus the combine
    that returns the same copies.
    """
    per_slot = lr.expert_tokens[straggler]
    hot = int(np.argmax(per_slot)) if per_slot.size else 0
    flow = lr.busiest_flow
    if flow is None:
        assert lr.copies is not None
        flow = busiest_flow(lr.copies)
    src, dst, copies = flow
    return {
        "straggler_expert": int(slots[straggler, hot]) if slots is not None else -1,
        "straggler_expert_tokens": float(per_slot[hot]) if per_slot.size else 0.0,
        "straggler_load": int(lr.device_load[straggler]),
        "busiest_pair_src": int(src),
        "busiest_pair_dst": int(dst),
        "busiest_pair_bytes": float(copies * wire_bytes),
    }


def _link_name(topo: Topology, i: int) -> str:
    """A link as people name it, e.g. ``leaf (rail 7, group 0) → device 15``."""

    def end(node: tuple[Any, ...]) -> str:
        kind, *ids = node
        if kind == "dev":
            return f"device {ids[0]}"
        if kind == "leaf":
            return f"leaf (rail {ids[0]}, group {ids[1]})"
        return f"{'NVSwitch' if kind == 'nvswitch' else kind} {' '.join(map(str, ids))}"

    a, b = topo.link_name(i)
    return f"{end(a)} → {end(b)}"


def _link_columns(
    routed: dict[int, LayerRouting], topo: Topology, dispatch_bytes: float
) -> dict[str, list[Any]]:
    """Per MoE layer (in ``routed`` order): the fabric link the dispatch loads most, its
    dispatch bytes and the time they take it at its achievable bandwidth (NaN / "" when
    the cluster is too large to route every pair, see ``LINK_LOADS_MAX_DEVICES``)."""
    cols: dict[str, list[Any]] = {
        "busiest_link": [],
        "busiest_link_bytes": [],
        "busiest_link_us": [],
    }
    for lr in routed.values():
        link = lr.busiest_link
        if link is None:
            cols["busiest_link"].append("")
            cols["busiest_link_bytes"].append(float("nan"))
            cols["busiest_link_us"].append(float("nan"))
            continue
        i, copies = link
        nbytes = copies * dispatch_bytes
        cols["busiest_link"].append(_link_name(topo, i))
        cols["busiest_link_bytes"].append(nbytes)
        cols["busiest_link_us"].append(nbytes / (float(topo.capacity_gbps[i]) * 1e3))
    return cols


def simulate_mode(prep: Prepared, mode: str) -> ModeResult:
    """Simulate ``scenario.steps`` steps of one mode."""
    sc, shape, hw = prep.scenario, prep.shape, prep.hw
    n_mb = 2 if sc.overlap else 1
    tokens = sc.tokens_per_device // n_mb
    costs = layer_costs(
        shape,
        hw,
        tokens=tokens,
        sequence_length=sc.sequence_length,
        mode=mode,
        dtype=sc.precision,
        model=cost_model_for(hw),
    )
    d = prep.cluster.num_devices
    cap = slot_capacity(sc.capacity.factor, d * tokens * shape.top_k, prep.placement.slots[0].size)
    metrics, layers, records, step_times = [], [], [], []
    program: list[Op] = []
    flow_events = 0
    for step in range(sc.steps):
        per_mb = [_StreamedRouting(prep, step, m, n_mb) for m in range(n_mb)]
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
                dispatch_dtype=sc.dispatch_dtype,
            )
            for r in per_mb
        ]
        program = programs[0] if n_mb == 1 else interleave_microbatches(programs)
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
        flow_events += sum(op.flow_events for op in program if isinstance(op, Exchange))
        rec = run_program(program, d)
        m = _metrics_frame(program, rec, routed, step, prep.cluster.devices_per_node)
        metrics.append(m)
        wire = bytes_per_assignment(shape.d_model, sc.dispatch_dtype) + bytes_per_assignment(
            shape.d_model, sc.combine_dtype
        )
        frame = _layer_frame(
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
        )
        disp = bytes_per_assignment(shape.d_model, sc.dispatch_dtype)
        layers.append(frame.assign(**_link_columns(routed, prep.cluster.topology, disp)))
        records.append(rec)
        step_times.append(float(rec.end_us.max()))
    mdf = pd.concat(metrics, ignore_index=True)
    mdf.insert(0, "mode", mode)
    ldf = pd.concat(layers, ignore_index=True)
    ldf.insert(0, "mode", mode)
    return ModeResult(
        mode=mode,
        metrics=mdf,
        layers=ldf,
        summary=_summary(prep, mode, mdf, ldf, records, program, step_times)
        | {"flow_events": flow_events},
        program=program,
        records=records,
    )


def _summary(
    prep: Prepared,
    mode: str,
    mdf: pd.DataFrame,
    ldf: pd.DataFrame,
    records: list[Records],
    program: list[Op],
    step_times: list[float],
) -> dict[str, Any]:
    """Headline figures of the last step (all steps' times are listed too)."""
    sc = prep.scenario
    last = records[-1]
    end = last.end_us[-1]  # every device's finish time
    critical = int(np.argmax(end))
    step_time = float(end[critical])
    breakdown = {
        "expert_us": 0.0,
        "dispatch_us": 0.0,
        "combine_us": 0.0,
        "allreduce_us": 0.0,
        "other_us": 0.0,
    }
    for i, op in enumerate(program):
        breakdown[f"{op.category}_us"] += float(last.duration_us[i, critical])
    # idle time is what no op covers; with two-stream overlap, busy time counted twice
    # is reported as overlapped, so busy parts + waiting - overlapped = step time
    busy = _union_us(last.start_us[:, critical], last.end_us[:, critical])
    breakdown["wait_us"] = step_time - busy
    overlapped = sum(v for k, v in breakdown.items() if k != "wait_us") - busy
    # without overlap the two sums are equal: keep rounding noise (1e-13 µs) out of the figure
    breakdown["overlapped_us"] = overlapped if abs(overlapped) > 1e-6 * max(busy, 1.0) else 0.0
    lastl = ldf[ldf["step"] == sc.steps - 1].sort_values("layer")
    assignments = int(ldf["assignments"].sum())
    tokens = prep.cluster.num_devices * sc.tokens_per_device
    return {
        "scenario": sc.name,
        "mode": mode,
        "hardware": prep.hw.name,
        "model": prep.shape.name,
        "devices": prep.cluster.num_devices,
        "nodes": sc.cluster.nodes,
        "devices_per_node": sc.cluster.devices_per_node,
        "tokens_per_device": sc.tokens_per_device,
        "capacity_factor": sc.capacity.factor,
        "overflow": sc.capacity.overflow,
        "slot_capacity": None if pd.isna(cap0 := ldf["slot_capacity"].iloc[0]) else int(cap0),
        "step_time_us": step_time,
        "step_times_us": step_times,
        "critical_device": critical,
        "breakdown_us": breakdown,
        "tokens_per_s": _processed_tokens_per_s(tokens, ldf, step_time),
        "layers": [int(x) for x in lastl["layer"]],
        "expert_balance": [round(float(x), 6) for x in lastl["expert_balance"]],
        "routed_balance": [round(float(x), 6) for x in lastl["routed_balance"]],
        "processed_balance": [round(float(x), 6) for x in lastl["processed_balance"]],
        "dropless_capacity_factor": [round(float(x), 6) for x in lastl["dropless_capacity_factor"]],
        "straggler_device": [int(x) for x in lastl["straggler_device"]],
        "straggler_cause": [str(x) for x in lastl["straggler_cause"]],
        "straggler_phase": [str(x) for x in lastl["straggler_phase"]],
        "straggler_penalty": [round(float(x), 6) for x in lastl["straggler_penalty"]],
        "injected": _injected(sc.stragglers),
        "drop_rate": float(ldf["dropped"].sum() / assignments) if assignments else 0.0,
        "dropped": int(ldf["dropped"].sum()),
        "rerouted": int(ldf["rerouted"].sum()),
        "assignments": assignments,
        "cross_node_bytes": float(lastl["cross_node_bytes"].sum()),
        "events": int(sum(r.events for r in records)),
    } | _memory_summary(prep, mode, float(ldf["dropless_capacity_factor"].max()))


def _injected(st: Stragglers) -> dict[str, Any]:
    """The faults a scenario injects (JSON-ready, devices as strings); empty when none."""
    out: dict[str, Any] = {}
    if st.slow_devices:
        out["slow_devices"] = {str(k): v for k, v in sorted(st.slow_devices.items())}
    if st.jitter:
        out["jitter"] = st.jitter
    if st.degraded_nics:
        out["degraded_nics"] = {str(k): v for k, v in sorted(st.degraded_nics.items())}
    return out


def _processed_tokens_per_s(tokens: int, ldf: pd.DataFrame, step_time_us: float) -> float:
    """Throughput counting processed assignments only: ``tokens × (processed assignments /
    all assignments) / step time``, the assignments summed over every layer and step (a
    dropless run processes them all)."""
    if step_time_us <= 0:
        return 0.0
    assignments = int(ldf["assignments"].sum())
    processed = assignments - int(ldf["dropped"].sum())
    share = processed / assignments if assignments else 1.0
    return tokens * share / (step_time_us * 1e-6)


def _memory_summary(prep: Prepared, mode: str, dropless_factor: float) -> dict[str, Any]:
    """Bytes per device (see :mod:`moesim.costs.memory` for what is counted) and HBM size;
    and the bytes per device a padded kernel would hold at ``dropless_factor``, the smallest
    capacity factor that drops nothing (worst layer), so a dropless run shows the trade-off."""
    sc = prep.scenario

    def at(factor: float | None) -> Any:
        return memory_per_device(
            prep.shape,
            num_devices=prep.cluster.num_devices,
            mode=mode,
            tokens_per_device=sc.tokens_per_device,
            sequence_length=sc.sequence_length,
            precision=sc.precision,
            capacity_factor=factor,
            hbm_bytes=prep.hw.memory.hbm_bytes,
            expert_slots=int(prep.placement.slots.shape[2]),
        )

    mem = at(sc.capacity.factor)
    return {
        "memory_per_device_bytes": mem.total_bytes,
        "hbm_bytes": mem.hbm_bytes,
        "memory_fits": mem.fits,
        "memory_breakdown_bytes": mem.as_dict(),
        "padded_capacity_factor": round(dropless_factor, 6),
        "padded_memory_per_device_bytes": at(dropless_factor).total_bytes,
    }


def _union_us(start: np.ndarray, end: np.ndarray) -> float:
    """Total length of the union of intervals [start, end)."""
    keep = end > start
    order = np.argsort(start[keep], kind="stable")
    total, cur_s, cur_e = 0.0, None, None
    for s_, e_ in zip(start[keep][order], end[keep][order], strict=True):
        if cur_e is None or s_ > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = float(s_), float(e_)
        else:
            cur_e = max(cur_e, float(e_))
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total


def simulate(scenario: Scenario, base_dir: Path, source: str | Path = "<scenario>") -> SimResult:
    """Simulate every mode the scenario asks for."""
    prep = prepare(scenario, base_dir, source)
    runs = [simulate_mode(prep, mode) for mode in scenario.modes]
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
        },
    )
