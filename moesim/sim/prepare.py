"""A scenario's inputs, loaded and checked against each other: the first stage of a run.

:func:`prepare` reads the hardware profile, the model, the routing (a trace, synthetic
tokens, or a count-level law) and the placement (a planner run on the routing's loads, or
a file), builds the cluster's topology and hands the next stage a :class:`Prepared` of
plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from moesim.dispatchers import Dispatcher, compute_slowdown
from moesim.errors import InputError
from moesim.hardware import HardwareProfile, get_profile
from moesim.model.shapes import ModelShape, get_preset
from moesim.placement.base import Placement, contiguous
from moesim.placement.planners import STRATEGIES
from moesim.scenario import Scenario
from moesim.sim.bounds import check_bounds
from moesim.sim.cluster import ClusterSpec, resolve_granularity
from moesim.sim.counts import inclusion_probabilities
from moesim.topology import build_topology
from moesim.topology.build import Topology
from moesim.traces.store import RoutingTrace, open_trace
from moesim.traces.synthetic import Popularity, parse_distribution, synthesize
from moesim.traces.window import ReplayTrace, read_replay

__all__ = ["Prepared", "RoutingLevel", "prepare", "routing_level"]


@dataclass(frozen=True)
class RoutingLevel:
    """The level synthetic routing runs at, and why (``routing.synthetic.level``)."""

    level: Literal["token", "count"]
    reason: str  # "set in the scenario", or "auto: ..." naming what decided it

    def __str__(self) -> str:
        return f"routing level: {self.level} ({self.reason})"


#: the placements planned without the routing's loads; every other planner plans from them
_LOAD_BLIND_PLACEMENTS = ("contiguous", "round-robin")


def routing_level(scenario: Scenario, shape: ModelShape, dispatcher: Dispatcher) -> RoutingLevel:
    """The level a scenario's synthetic routing runs at.

    ``token`` and ``count`` are taken as written. ``auto`` is ``count`` unless the answer
    depends on which token made which assignment, or count level would differ from token
    level in distribution; the first such feature, in this order, keeps it at ``token``:

    * a dispatcher that de-duplicates copies (one per (token, device) or (token, node));
    * a capacity factor: which assignments overflow follows GShard's rank-then-token
      order (count level drops the same share of every sender; reroute is token only);
    * a placement planned from the routing's loads (token level plans from the very
      tokens it routes, count level from expected loads); ``affinity`` also needs
      co-activation;
    * ``least-loaded`` or ``batch-split`` replica choice (at count level the (D, D)
      traffic is the proportional split of the loads, not the tokens' own);
    * a group-limited model under non-uniform popularity (count level draws each
      expert's marginal, which the limit changes).

    Both levels draw step s from step s's popularity, so ``drift`` and ``burst`` need
    neither level in particular.
    """
    syn = scenario.routing.synthetic
    assert syn is not None, "routing level of synthetic routing only"
    if syn.level != "auto":
        return RoutingLevel(syn.level, "set in the scenario")
    dist = parse_distribution(syn.distribution)
    cap = scenario.capacity
    needs = [
        (
            dispatcher.dedup != "none",
            f"dispatcher {dispatcher.name} sends one copy per (token, {dispatcher.dedup})",
        ),
        (
            cap.factor is not None,
            f"capacity factor {cap.factor} ({cap.overflow}) overflows in token order",
        ),
        (
            scenario.placement in STRATEGIES and scenario.placement not in _LOAD_BLIND_PLACEMENTS,
            f"placement {scenario.placement} is planned from the drawn tokens",
        ),
        (
            scenario.replica_choice in ("least-loaded", "batch-split"),
            f"replica_choice {scenario.replica_choice} splits the tokens themselves",
        ),
        (
            shape.groups is not None and dist.kind != "uniform",
            f"{shape.name}'s group limit under non-uniform popularity",
        ),
    ]
    reason = next((why for need, why in needs if need), None)
    if reason is None:
        return RoutingLevel("count", "auto: no token identity needed")
    return RoutingLevel("token", f"auto: {reason}")


@dataclass(frozen=True)
class Prepared:
    """A scenario's inputs, loaded and checked against each other."""

    scenario: Scenario
    shape: ModelShape
    hw: HardwareProfile
    # a trace's replayed tokens, token-level synthetic routing, or None: count-level
    # synthetic routing from ``popularity``
    trace: ReplayTrace | RoutingTrace | None
    placement: Placement
    cluster: ClusterSpec
    moe_layers: list[int]  # model layer index of each trace layer, in order
    dispatcher: Dispatcher
    popularity: Popularity | None = None
    level: RoutingLevel | None = None  # synthetic routing's level; None for a trace


def prepare(scenario: Scenario, base_dir: Path, source: str | Path = "<scenario>") -> Prepared:
    """Load the hardware, model, routing and placement a scenario names, and cross-check them."""
    try:
        hw_name = scenario.hardware
        if hw_name.endswith((".yaml", ".yml")) and not Path(hw_name).is_absolute():
            hw_name = str(base_dir / hw_name)  # a profile file next to the scenario
        hw = get_profile(hw_name)
        shape = get_preset(scenario.model) if isinstance(scenario.model, str) else scenario.model
        dispatcher = scenario.dispatcher.resolve(hw)
        compute_slowdown(hw, dispatcher)  # holds fewer SMs than the device has
    except InputError as err:
        if err.file is not None:
            raise
        raise InputError(err.message, file=source, field=err.field, value=err.value) from None
    moe_layers = shape.moe_layer_indices()
    syn = scenario.routing.synthetic
    level = None if syn is None else routing_level(scenario, shape, dispatcher)
    if level is not None:  # a trace's size is checked once it is opened
        check_bounds(scenario, shape, source, count_level=level.level == "count")
    seed = scenario.seed if syn is None or syn.seed is None else syn.seed
    trace: ReplayTrace | RoutingTrace | None = None
    if scenario.routing.trace is not None:
        tpath = scenario.routing.trace
        tpath = tpath if tpath.is_absolute() else base_dir / tpath
        try:
            info = open_trace(tpath)
            check_bounds(scenario, shape, source, trace_tokens=max(info.rows.values()))
        except InputError as err:
            raise _trace_error(err, scenario, source) from None
        if info.num_experts != shape.num_experts:
            raise InputError(
                f"trace has {info.num_experts} experts, model {shape.name} has {shape.num_experts}",
                file=tpath,
                field="num_experts",
                value=info.num_experts,
            )
        if info.top_k != shape.top_k:
            raise InputError(
                f"trace routes top-{info.top_k}, model {shape.name} top-{shape.top_k}",
                file=tpath,
                field="top_k",
                value=info.top_k,
            )
        try:
            src = layer_sources(
                scenario.routing.layer_map, info.layers, len(moe_layers), shape.name
            )
        except InputError as err:
            raise InputError(err.message, file=source, field=err.field, value=err.value) from None
        if src is None:
            raise InputError(
                f"trace has {len(info.layers)} MoE layers, model {shape.name} has "
                f"{len(moe_layers)}: set routing.layer_map (cycle, or a list of trace layers)",
                file=tpath,
                field="layers",
                value=len(info.layers),
            )
        if scenario.placement == "affinity" and src != list(range(len(info.layers))):
            raise InputError(
                "the affinity planner needs the trace's own consecutive layers: drop "
                "routing.layer_map or choose another placement",
                file=source,
                field="routing.layer_map",
                value=scenario.routing.layer_map,
            )
        try:  # the tokens the steps replay, read layer by layer
            trace = read_replay(
                tpath,
                scenario.cluster.num_devices * scenario.tokens_per_device * scenario.steps,
                pairs=scenario.placement == "affinity",
            )
        except InputError as err:
            raise _trace_error(err, scenario, source) from None
        if src != list(range(len(info.layers))):
            trace = trace.mapped(src)
    popularity = None
    if level is not None and level.level == "count":
        assert syn is not None
        for field_name, value, ok in (
            ("capacity.overflow", scenario.capacity.overflow, "drop"),
            ("dispatcher.dedup", dispatcher.dedup, "none"),
        ):
            # dropless, nothing overflows: the overflow policy is never used
            moot = field_name == "capacity.overflow" and scenario.capacity.factor is None
            if value != ok and not moot:
                hint = (
                    f" (dispatcher {dispatcher.name} de-duplicates: set dispatcher: "
                    f"{{preset: {dispatcher.name}, dedup: none}} to count every copy)"
                    if field_name == "dispatcher.dedup"
                    else ""
                )
                raise InputError(
                    f"count-level routing supports {field_name} {ok} only{hint}",
                    file=source,
                    field=field_name,
                    value=value,
                )
        dist = parse_distribution(syn.distribution)
        if shape.groups is not None and dist.kind != "uniform":
            # counts are drawn from each expert's marginal; a group limit leaves those
            # marginals at k / E only under uniform popularity (by symmetry)
            raise InputError(
                f"count-level routing cannot keep {shape.name}'s group limit under "
                "non-uniform popularity: use level: token",
                file=source,
                field="routing.synthetic.distribution",
                value=syn.distribution,
            )
        popularity = Popularity(dist, shape.num_experts, len(moe_layers), seed)
    elif syn is not None:
        trace = synthesize(
            num_experts=shape.num_experts,
            top_k=shape.top_k,
            num_layers=len(moe_layers),
            num_tokens=scenario.cluster.num_devices * scenario.tokens_per_device * scenario.steps,
            distribution=syn.distribution,
            steps=scenario.steps,  # step s draws its tokens from step s's popularity
            seed=seed,
            groups=shape.groups,
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
        topology = _topology(
            hw, cl.num_devices, cl.devices_per_node, net.oversubscription, net.nodes_per_leaf
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
        granularity=resolve_granularity(net.granularity, topology),
        hot_device=net.hot_device,
    )
    return Prepared(
        scenario, shape, hw, trace, placement, cluster, moe_layers, dispatcher, popularity, level
    )


#: topologies built in this process, by profile object (profiles are read once per
#: process) and cluster shape, each kept with its profile; a sweep's cases share them
_TOPOLOGIES: dict[tuple[int, int, int, float, int | None], tuple[HardwareProfile, Topology]] = {}
_TOPOLOGIES_KEPT = 8


def _topology(
    hw: HardwareProfile,
    num_devices: int,
    devices_per_node: int,
    oversubscription: float,
    nodes_per_leaf: int | None,
) -> Topology:
    """:func:`~moesim.topology.build_topology` of the cluster, built once per process."""
    key = (id(hw), num_devices, devices_per_node, oversubscription, nodes_per_leaf)
    kept = _TOPOLOGIES.get(key)
    if kept is not None and kept[0] is hw:
        return kept[1]
    topology = build_topology(
        hw,
        num_devices,
        devices_per_node,
        oversubscription=oversubscription,
        nodes_per_leaf=nodes_per_leaf,
    )
    if len(_TOPOLOGIES) >= _TOPOLOGIES_KEPT:
        _TOPOLOGIES.clear()
    _TOPOLOGIES[key] = (hw, topology)
    return topology


def _trace_error(err: InputError, scenario: Scenario, source: str | Path) -> InputError:
    """A trace error as it is reported: naming the scenario's ``routing.trace`` when the
    trace is missing, else the trace file."""
    if err.file is None or err.message in ("trace not found", "file not found"):
        return InputError(
            err.message, file=source, field="routing.trace", value=str(scenario.routing.trace)
        )
    return err


def _placement(
    scenario: Scenario,
    shape: ModelShape,
    hw: HardwareProfile,
    trace: ReplayTrace | RoutingTrace | None,
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
        elif isinstance(trace, ReplayTrace):  # counted over the whole trace as it was read
            loads = trace.loads
        else:
            ids = trace.expert_ids  # (L, N, K)
            key = np.arange(num_layers)[:, None] * e + ids.reshape(num_layers, -1)
            loads = np.bincount(key.ravel(), minlength=num_layers * e).reshape(num_layers, e)
        if name == "affinity":
            assert trace is not None
            if isinstance(trace, ReplayTrace):
                assert trace.coactivation is not None
                co, cross = trace.coactivation
            else:
                from moesim.placement.affinity import coactivation

                co, cross = coactivation(trace.expert_ids, e)
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


def layer_sources(
    layer_map: Literal["cycle"] | list[int] | None,
    trace_layers: Sequence[int],
    moe_layers: int,
    model: str,
) -> list[int] | None:
    """The trace layer index each of the model's ``moe_layers`` MoE layers replays under
    ``layer_map`` (``routing.layer_map``); None when there is no map and the counts differ.

    ``cycle``: MoE layer i replays trace layer i mod L; a list names the trace's own layer
    number for each MoE layer (:class:`InputError` for one the trace lacks, or a list of
    the wrong length)."""
    n = len(trace_layers)
    if layer_map is None:
        return list(range(n)) if n == moe_layers else None
    if layer_map == "cycle":
        return [i % n for i in range(moe_layers)]
    if len(layer_map) != moe_layers:
        raise InputError(
            f"lists {len(layer_map)} trace layers; model {model} has {moe_layers} MoE layers",
            field="routing.layer_map",
            value=len(layer_map),
        )
    index = {layer: i for i, layer in enumerate(trace_layers)}
    missing = [x for x in layer_map if x not in index]
    if missing:
        raise InputError(
            f"names a layer the trace lacks (its layers: {list(trace_layers)})",
            field="routing.layer_map",
            value=missing[0],
        )
    return [index[x] for x in layer_map]
