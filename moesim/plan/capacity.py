"""Capacity planning: how many devices hold a model, meet a throughput and a latency target.

For each hardware profile the planner answers three questions, each by the fewest devices:

1. **memory**: every device holds its dense weights, its expert slots, activations and KV
   cache (:func:`moesim.costs.memory.memory_per_device`); pure arithmetic, no simulation.
2. **throughput**: the simulated tokens/s reaches the target.
3. **latency** (when a target is given): throughput met and the simulated step time (for
   decode, the time per output token) is within the target.

Cluster sizes are the profile's nodes × devices per node (a single node may be partly used:
1, 2, 4 … devices), kept to the sizes the placement accepts (contiguous: experts a multiple
of devices or devices a multiple of experts; with redundant slots, experts + redundant
slots a multiple of devices). The search starts at the memory answer, doubles the device
count until the target is met, then bisects between the last size that failed and the
first that passed; it assumes throughput grows with the device count, and stops doubling
once a doubled size does no better than the one before (tokens/s for throughput, step time
for latency), saying so in the plan's notes. With a fixed number
of nodes (``PlanRequest.nodes``) only that size is evaluated.

Expert capacity is unlimited (dropless) unless the request gives a drop budget
(``max_drop_rate`` > 0): then each capacity factor of a ladder is tried on the routing alone
(the simulator's own routing step) and the smallest whose drop rate is within the budget is
simulated, and dropless too: a budget is an allowance, so the factor is kept only where it
gives more processed tokens/s than dropless. No answer drops more than the budget. A
dropless answer reports the capacity factor a padded (non-dropless) kernel would need to
drop nothing (``LayerRouting.dropless_capacity_factor``, worst layer) and the memory at that
factor. Each available placement strategy is simulated and the fastest kept; tokens/s
counts processed assignments only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from moesim.costs.memory import MemoryEstimate, contiguous_slots, memory_per_device
from moesim.errors import InputError
from moesim.hardware import HardwareProfile, get_profile
from moesim.model.shapes import ModelShape, get_preset
from moesim.scenario import Scenario
from moesim.sim.prepare import Prepared, prepare
from moesim.sim.replay import route_layer_at
from moesim.sim.routing import LayerRouting
from moesim.sim.simulate import ModeResult, SimResult, simulate_mode
from moesim.sweep.results import metric_values

__all__ = [
    "CAPACITY_LADDER",
    "Evaluation",
    "HardwarePlan",
    "PlanRequest",
    "available_placements",
    "cluster_sizes",
    "drop_frame",
    "evaluations_frame",
    "min_devices_memory",
    "plan_capacity",
    "plan_hardware",
]

CAPACITY_LADDER = (1.0, 1.1, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class PlanRequest:
    """What the planner is asked, and the assumptions of its simulations."""

    model: str
    hardware: tuple[str, ...]
    tokens_per_s: float
    latency_slo_ms: float | None = None
    trace: Path | None = None
    distribution: str = "uniform"
    precision: str = "bf16"
    prices_per_device_hour: tuple[float, ...] = ()
    max_drop_rate: float = 0.0
    mode: str = "decode"
    tokens_per_device: int = 64
    sequence_length: int = 4096
    steps: int = 1
    seed: int = 0
    max_devices: int = 4096
    capacity_factors: tuple[float, ...] = CAPACITY_LADDER
    redundant: int = 0
    nodes: int | None = None

    @property
    def dropless(self) -> bool:
        """No drop budget: every simulation runs with unlimited expert capacity."""
        return self.max_drop_rate == 0

    def price(self, index: int) -> float | None:
        """Price per device-hour of the ``index``-th hardware (one price applies to all)."""
        p = self.prices_per_device_hour
        if not p:
            return None
        return p[0] if len(p) == 1 else p[index]


@dataclass(frozen=True)
class Evaluation:
    """One cluster size simulated: the chosen capacity factor (None: dropless) and placement,
    and the result.

    ``padding_factor``: the capacity factor a padded kernel would need to drop nothing on
    this routing (the largest slot load over the mean, worst layer step);
    ``padded_memory_bytes``: memory per device at it.
    """

    hardware: str
    num_devices: int
    nodes: int
    devices_per_node: int
    placement: str
    redundant_slots: int
    capacity_factor: float | None
    drop_rate: float
    drop_rates: dict[float, float]  # capacity factor -> drop rate, on the routing alone
    factor_tokens_per_s: dict[float, float]  # the factor simulated with a budget -> tokens/s
    placements_tokens_per_s: dict[str, float]
    padding_factor: float
    padded_memory_bytes: float
    memory: MemoryEstimate  # per device at the request's precision (int4 is simulated as fp8)
    result: SimResult = field(repr=False)

    @property
    def run(self) -> ModeResult:
        return self.result.runs[0]

    @property
    def step_time_us(self) -> float:
        return float(self.run.summary["step_time_us"])

    @property
    def tokens_per_s(self) -> float:
        """Processed tokens/s: tokens × processed share of assignments / step time."""
        return float(self.run.summary["tokens_per_s"])

    @property
    def memory_fits(self) -> bool:
        return self.memory.fits


@dataclass
class HardwarePlan:
    """The answers for one hardware profile."""

    hardware: str
    hbm_bytes: float
    min_devices_memory: int | None
    min_devices_throughput: int | None
    min_devices_slo: int | None
    evaluations: dict[int, Evaluation]
    price_per_device_hour: float | None
    notes: list[str]
    fixed_devices: int | None = None

    @property
    def recommended(self) -> Evaluation | None:
        """The configuration answering the strictest question asked (with a fixed cluster
        size: that size, when the model fits it)."""
        if self.fixed_devices is not None:
            ev = self.evaluations.get(self.fixed_devices)
            return ev if ev is not None and ev.memory_fits else None
        n = self.min_devices_slo if self.min_devices_slo is not None else None
        if n is None and self.min_devices_throughput is not None:
            n = self.min_devices_throughput
        return self.evaluations.get(n) if n is not None else None

    def answer(self, request: PlanRequest) -> dict[str, Any]:
        """JSON-ready answer (see ``moesim plan-capacity --json``)."""
        rec = self.recommended
        out: dict[str, Any] = {
            "min_devices_memory": self.min_devices_memory,
            "min_devices_throughput": self.min_devices_throughput,
            "min_devices_slo": self.min_devices_slo,
            "recommended_devices": rec.num_devices if rec else None,
            "nodes": rec.nodes if rec else None,
            "devices_per_node": rec.devices_per_node if rec else None,
            "fixed_devices": self.fixed_devices,
            "dropless": rec.capacity_factor is None if rec else None,
            "recommended_capacity_factor": rec.capacity_factor if rec else None,
            "recommended_placement": rec.placement if rec else None,
            "redundant_slots": rec.redundant_slots if rec else None,
            "max_drop_rate": request.max_drop_rate,
            "drop_rate": rec.drop_rate if rec else None,
            "tokens_per_s": rec.tokens_per_s if rec else None,
            "step_time_us": rec.step_time_us if rec else None,
            "memory_per_device_bytes": rec.memory.total_bytes if rec else None,
            "memory_fits": rec.memory_fits if rec else None,
            "padding_factor": rec.padding_factor if rec else None,
            "padded_memory_per_device_bytes": rec.padded_memory_bytes if rec else None,
            "hbm_bytes": self.hbm_bytes,
            "price_per_device_hour": self.price_per_device_hour,
            "cost_per_million_tokens": None,
            "notes": self.notes,
        }
        if rec and self.price_per_device_hour is not None and rec.tokens_per_s > 0:
            out["cost_per_million_tokens"] = (
                rec.num_devices * self.price_per_device_hour / (rec.tokens_per_s * 3600) * 1e6
            )
        return out


def available_placements() -> list[str]:
    """Placements the planner tries at every size: Megatron's contiguous default (one copy
    per expert, no redundant slots) and a load-balanced packing planned from the routing
    (EPLB-style, global), which also fills the request's redundant slots with replicas of
    the most loaded experts."""
    from moesim.placement.planners import STRATEGIES

    return [p for p in ("contiguous", "eplb-global") if p in STRATEGIES]


def cluster_sizes(
    num_experts: int, devices_per_node: int, max_devices: int, redundant: int = 0
) -> list[int]:
    """Device counts to search, ascending: part of one node (powers of two dividing the node),
    then whole nodes; kept to counts the placements accept (contiguous: experts a multiple of
    devices or devices a multiple of experts; with ``redundant`` slots per layer, experts +
    redundant slots a multiple of devices)."""
    partial = [
        d for d in (1, 2, 4, 8, 16, 32) if d < devices_per_node and devices_per_node % d == 0
    ]
    whole = range(devices_per_node, max_devices + 1, devices_per_node)
    return [d for d in (*partial, *whole) if _accepts(num_experts, d, redundant)]


def _accepts(num_experts: int, d: int, redundant: int) -> bool:
    if redundant:
        return (num_experts + redundant) % d == 0
    return num_experts % d == 0 or d % num_experts == 0


def _expert_slots(num_experts: int, d: int, redundant: int) -> int:
    """Expert slots per device: contiguous, or ``(E + redundant) / D`` with redundant slots."""
    return (num_experts + redundant) // d if redundant else contiguous_slots(num_experts, d)


def min_devices_memory(
    shape: ModelShape, hw: HardwareProfile, request: PlanRequest, sizes: Sequence[int]
) -> int | None:
    """Fewest devices of ``sizes`` whose per-device memory fits in HBM: dropless (one
    activation per assignment), or with a drop budget at the largest capacity factor of the
    ladder (the most activation memory the search may pick); with the request's redundant
    slots."""
    cf = None if request.dropless else max(request.capacity_factors)
    for d in sizes:
        slots = _expert_slots(shape.num_experts, d, request.redundant)
        if _memory(shape, hw, request, d, cf, slots, request.precision).fits:
            return d
    return None


def _memory(
    shape: ModelShape,
    hw: HardwareProfile,
    request: PlanRequest,
    devices: int,
    capacity_factor: float | None,
    expert_slots: int,
    precision: str,
) -> MemoryEstimate:
    """Memory per device of the request's mode and batch on ``devices`` devices."""
    return memory_per_device(
        shape,
        num_devices=devices,
        mode=request.mode,
        tokens_per_device=request.tokens_per_device,
        sequence_length=request.sequence_length,
        precision=precision,
        capacity_factor=capacity_factor,
        hbm_bytes=hw.memory.hbm_bytes,
        expert_slots=expert_slots,
    )


def _sim_precision(precision: str) -> str:
    """The scenario precision the simulation runs at: int4 weights are timed as fp8 GEMMs
    (weights dequantised to fp8 on load, W4A8)."""
    return "fp8" if precision == "int4" else precision


def _routed_layers(prep: Prepared, steps: int) -> Iterator[LayerRouting]:
    """Every (step, MoE layer) routing of :func:`route_step`, one layer at a time (a layer's
    (D, D) matrices are let go before the next is routed: large clusters stay in memory)."""
    for step in range(steps):
        for li in range(len(prep.moe_layers)):
            yield route_layer_at(prep, step, li)


def _drop_rate(prep: Prepared, steps: int) -> float:
    dropped = assignments = 0
    for lr in _routed_layers(prep, steps):
        dropped += int(lr.dropped.sum())
        assignments += lr.assignments
    return dropped / assignments if assignments else 0.0


def _with_factor(sc: Scenario, factor: float | None) -> Scenario:
    return sc.model_copy(update={"capacity": sc.capacity.model_copy(update={"factor": factor})})


def _evaluate(
    shape: ModelShape, hw_name: str, hw: HardwareProfile, request: PlanRequest, d: int
) -> Evaluation | None:
    """Simulate ``d`` devices: each placement, dropless, and with a drop budget at the
    smallest capacity factor within it (picked on routing) where that is faster; the
    fastest placement is kept."""
    dpn = min(d, hw.devices_per_node)
    routing: dict[str, Any] = (
        {"trace": request.trace}
        if request.trace is not None
        else {"synthetic": {"distribution": request.distribution}}
    )
    best: Evaluation | None = None
    per_placement: dict[str, float] = {}
    for placement in available_placements():
        redundant = 0 if placement == "contiguous" else request.redundant
        if not _accepts(shape.num_experts, d, redundant):
            continue
        base = Scenario(
            name=f"plan-{shape.name}-{hw_name}-{d}",
            hardware=hw_name,
            cluster={"nodes": d // dpn, "devices_per_node": dpn},
            model=shape,
            routing=routing,
            placement=placement,
            redundant_slots=redundant,
            capacity={"factor": None, "overflow": "drop"},
            mode=request.mode,
            tokens_per_device=request.tokens_per_device,
            sequence_length=request.sequence_length,
            precision=_sim_precision(request.precision),
            steps=request.steps,
            seed=request.seed,
        )
        try:
            prep = prepare(base, Path("."), source="plan-capacity")
        except InputError as err:
            if err.field == "placement":
                continue  # this strategy cannot place the experts on d devices
            raise
        drops: dict[float, float] = {}
        chosen: float | None = None  # dropless unless a factor keeps drops within the budget
        if not request.dropless:
            for cf in request.capacity_factors:
                drops[cf] = _drop_rate(
                    replace(prep, scenario=_with_factor(base, cf)), request.steps
                )
                if drops[cf] <= request.max_drop_rate:
                    chosen = cf
                    break
        sc = _with_factor(base, chosen)
        run = simulate_mode(replace(prep, scenario=sc), request.mode)
        factor_tokens: dict[float, float] = {}
        if chosen is not None:  # a budget is an allowance: drop only where it is faster
            factor_tokens[chosen] = float(run.summary["tokens_per_s"])
            free = simulate_mode(replace(prep, scenario=base), request.mode)
            if free.summary["tokens_per_s"] >= run.summary["tokens_per_s"]:
                chosen, sc, run = None, base, free
        # the routing's own figure: largest slot load over the mean slot load, before
        # capacity, worst layer step (LayerRouting.dropless_capacity_factor)
        pad = float(run.layers["dropless_capacity_factor"].max())
        slots = int(prep.placement.slots.shape[2])
        mem = _memory(prep.shape, hw, request, d, chosen, slots, request.precision)
        padded_mem = _memory(prep.shape, hw, request, d, pad, slots, request.precision).total_bytes
        result = SimResult(
            scenario=sc,
            shape=prep.shape,
            hw=prep.hw,
            runs=[run],
            inputs={
                "trace_tokens": prep.trace.num_tokens if prep.trace is not None else None,
                "trace_layers": list(range(len(prep.moe_layers))),
                "moe_layers": prep.moe_layers,
                "source": "moesim plan-capacity",
            },
        )
        per_placement[placement] = float(run.summary["tokens_per_s"])
        ev = Evaluation(
            hardware=hw.name,
            num_devices=d,
            nodes=d // dpn,
            devices_per_node=dpn,
            placement=placement,
            redundant_slots=redundant,
            capacity_factor=chosen,
            drop_rate=float(run.summary["drop_rate"]),
            drop_rates=drops,
            factor_tokens_per_s=factor_tokens,
            placements_tokens_per_s=per_placement,
            padding_factor=pad,
            padded_memory_bytes=float(padded_mem),
            memory=mem,
            result=result,
        )
        if best is None or ev.tokens_per_s > best.tokens_per_s:
            best = ev
    return best


def _search(
    sizes: list[int],
    start: int,
    ok: Callable[[int], bool],
    figure: Callable[[int], float] | None = None,
) -> tuple[int | None, int | None]:
    """Fewest of ``sizes[start:]`` passing ``ok``: doubling the device count from
    ``sizes[start]`` until one passes, then bisection between the last failure and it.

    With ``figure`` (higher is better: tokens/s, or minus the step time), the doubling
    stops when a doubled size that still fails does no better than the size before it: more
    devices no longer help (dropless decode of a skewed model, whose hottest expert's load
    grows with the cluster). Returns (the size, None), or (None, the size where the figure
    stopped improving, None when the sizes ran out).
    """
    if start >= len(sizes):
        return None, None
    lo, i = start - 1, start  # lo: index of the last size known to fail
    while not ok(sizes[i]):
        if figure is not None and lo >= start and figure(sizes[i]) <= figure(sizes[lo]):
            return None, sizes[lo]
        lo = i
        if i == len(sizes) - 1:
            return None, None
        target = 2 * sizes[i]
        i = next((j for j in range(i + 1, len(sizes)) if sizes[j] >= target), len(sizes) - 1)
    hi = i
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(sizes[mid]):
            hi = mid
        else:
            lo = mid
    return sizes[hi], None


def plan_hardware(
    request: PlanRequest,
    index: int,
    progress: Callable[[str], None] | None = None,
) -> HardwarePlan:
    """Answer the three questions for ``request.hardware[index]``."""
    hw_name = request.hardware[index]
    hw = get_profile(hw_name)
    shape = get_preset(request.model)
    notes: list[str] = []
    if request.nodes is not None:
        return _plan_fixed(request, index, shape, hw_name, hw, progress)
    sizes = cluster_sizes(
        shape.num_experts, hw.devices_per_node, request.max_devices, request.redundant
    )
    d_mem = min_devices_memory(shape, hw, request, sizes)
    evals: dict[int, Evaluation] = {}

    def evaluate(d: int) -> Evaluation | None:
        if d not in evals:
            if progress:
                progress(f"{hw.name}: simulating {d} devices")
            ev = _evaluate(shape, hw_name, hw, request, d)
            if ev is None:
                return None
            evals[d] = ev
        return evals[d]

    def meets_throughput(d: int) -> bool:
        ev = evaluate(d)
        return ev is not None and ev.memory_fits and ev.tokens_per_s >= request.tokens_per_s

    def meets_slo(d: int) -> bool:
        ev = evaluate(d)
        assert request.latency_slo_ms is not None
        return (
            meets_throughput(d)
            and ev is not None
            and ev.step_time_us <= request.latency_slo_ms * 1e3
        )

    def tokens_per_s(d: int) -> float:
        ev = evaluate(d)
        return ev.tokens_per_s if ev is not None and ev.memory_fits else 0.0

    def minus_step_time(d: int) -> float:
        ev = evaluate(d)
        return -ev.step_time_us if ev is not None and ev.memory_fits else -float("inf")

    largest = (
        f"{sizes[-1]} devices"
        + (
            f" (the largest count that divides the {shape.num_experts} experts and "
            f"{request.redundant} redundant slots)"
            if sizes and sizes[-1] + hw.devices_per_node <= request.max_devices
            else ""
        )
        if sizes
        else f"{request.max_devices} devices"
    )
    d_thr = d_slo = None
    if d_mem is None:
        notes.append(f"the model does not fit on up to {largest}")
    else:
        start = sizes.index(d_mem)
        d_thr, stall = _search(sizes, start, meets_throughput, tokens_per_s)
        if d_thr is None:
            notes.append(
                f"throughput stops growing past {stall} devices"
                if stall is not None
                else f"throughput not reached on up to {largest}"
            )
        elif request.latency_slo_ms is not None:
            d_slo, stall = _search(sizes, sizes.index(d_thr), meets_slo, minus_step_time)
            if d_slo is None:
                notes.append(
                    f"step time stops falling past {stall} devices: latency target not met"
                    if stall is not None
                    else f"latency target not met on up to {largest}"
                )
    plan = HardwarePlan(
        hardware=hw.name,
        hbm_bytes=float(hw.memory.hbm_bytes),
        min_devices_memory=d_mem,
        min_devices_throughput=d_thr,
        min_devices_slo=d_slo,
        evaluations=dict(sorted(evals.items())),
        price_per_device_hour=request.price(index),
        notes=notes,
    )
    return plan


def _plan_fixed(
    request: PlanRequest,
    index: int,
    shape: ModelShape,
    hw_name: str,
    hw: HardwareProfile,
    progress: Callable[[str], None] | None,
) -> HardwarePlan:
    """One cluster size, ``request.nodes`` × the profile's devices per node: what fits and
    how fast (no search)."""
    assert request.nodes is not None
    d = request.nodes * hw.devices_per_node
    notes: list[str] = []
    if not _accepts(shape.num_experts, d, request.redundant):
        what = (
            f"experts + redundant slots ({shape.num_experts} + {request.redundant})"
            if request.redundant
            else f"{shape.num_experts} experts"
        )
        raise InputError(
            f"{what} cannot be placed on {request.nodes} × {hw.devices_per_node} = {d} "
            f"{hw.name} devices",
            field="redundant" if request.redundant else "nodes",
            value=request.redundant if request.redundant else request.nodes,
        )
    d_mem = min_devices_memory(shape, hw, request, [d])
    if progress:
        progress(f"{hw.name}: simulating {d} devices")
    ev = _evaluate(shape, hw_name, hw, request, d)
    evals = {d: ev} if ev is not None else {}
    d_thr = d_slo = None
    if ev is None:
        notes.append(f"no placement places the experts on {d} devices")
    elif not ev.memory_fits:
        notes.append(f"the model does not fit on {d} devices")
    else:
        if ev.tokens_per_s >= request.tokens_per_s:
            d_thr = d
        else:
            notes.append(f"{d} devices give less than the {request.tokens_per_s:,.0f} tokens/s")
        if request.latency_slo_ms is not None:
            if d_thr is not None and ev.step_time_us <= request.latency_slo_ms * 1e3:
                d_slo = d
            else:
                notes.append(f"latency target not met on {d} devices")
    return HardwarePlan(
        hardware=hw.name,
        hbm_bytes=float(hw.memory.hbm_bytes),
        min_devices_memory=d_mem,
        min_devices_throughput=d_thr,
        min_devices_slo=d_slo,
        evaluations=evals,
        price_per_device_hour=request.price(index),
        notes=notes,
        fixed_devices=d,
    )


def plan_capacity(
    request: PlanRequest, progress: Callable[[str], None] | None = None
) -> list[HardwarePlan]:
    """Plan every hardware of the request, in the order given."""
    _check(request)
    return [plan_hardware(request, i, progress) for i in range(len(request.hardware))]


def _check(request: PlanRequest) -> None:
    get_preset(request.model)
    for name in request.hardware:
        get_profile(name)
    if request.precision not in ("bf16", "fp8", "int4"):
        raise InputError("valid: bf16, fp8, int4", field="precision", value=request.precision)
    if request.mode not in ("training", "prefill", "decode"):
        raise InputError("valid: training, prefill, decode", field="mode", value=request.mode)
    if request.tokens_per_s < 0 or (request.tokens_per_s == 0 and request.nodes is None):
        raise InputError("must be positive", field="tokens-per-s", value=request.tokens_per_s)
    if request.redundant < 0:
        raise InputError("must be >= 0", field="redundant", value=request.redundant)
    if request.nodes is not None and request.nodes < 1:
        raise InputError("must be >= 1", field="nodes", value=request.nodes)
    if request.latency_slo_ms is not None and request.latency_slo_ms <= 0:
        raise InputError("must be positive", field="latency-slo-ms", value=request.latency_slo_ms)
    if not 0 <= request.max_drop_rate < 1:
        raise InputError("must be in [0, 1)", field="max-drop-rate", value=request.max_drop_rate)
    n_prices = len(request.prices_per_device_hour)
    if n_prices not in (0, 1, len(request.hardware)):
        raise InputError(
            f"give one price, or one per hardware ({len(request.hardware)})",
            field="price-per-device-hour",
            value=list(request.prices_per_device_hour),
        )
    if any(p <= 0 for p in request.prices_per_device_hour):
        raise InputError(
            "must be positive",
            field="price-per-device-hour",
            value=list(request.prices_per_device_hour),
        )


def evaluations_frame(plans: list[HardwarePlan]) -> pd.DataFrame:
    """Every simulated size as a table with the sweep results' column names."""
    rows = []
    for plan in plans:
        for ev in plan.evaluations.values():
            s = ev.run.summary
            rows.append(
                {
                    "hardware": ev.hardware,
                    "model": s["model"],
                    "mode": s["mode"],
                    "placement": ev.placement,
                    "num_devices": ev.num_devices,
                    "nodes": ev.nodes,
                    "devices_per_node": ev.devices_per_node,
                    "tokens_per_device": s["tokens_per_device"],
                    "capacity_factor": ev.capacity_factor,
                    "redundant_slots": ev.redundant_slots,
                    **metric_values(s),
                    "memory_per_device_bytes": ev.memory.total_bytes,
                    "padding_factor": ev.padding_factor,
                    "padded_memory_per_device_bytes": ev.padded_memory_bytes,
                }
            )
    return pd.DataFrame(rows)


def drop_frame(plans: list[HardwarePlan]) -> pd.DataFrame:
    """Drop rate per capacity factor tried, per (hardware, devices)."""
    rows = [
        {
            "hardware": ev.hardware,
            "num_devices": ev.num_devices,
            "capacity_factor": cf,
            "drop_rate": rate,
        }
        for plan in plans
        for ev in plan.evaluations.values()
        for cf, rate in ev.drop_rates.items()
    ]
    return pd.DataFrame(rows)
