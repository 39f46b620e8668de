"""Capacity planning: how many devices hold a model, meet a throughput and a latency target.

For each hardware profile the planner answers three questions, each by the fewest devices:

1. **memory**: every device holds its dense weights, its expert slots, activations and KV
   cache (:func:`moesim.costs.memory.memory_per_device`); pure arithmetic, no simulation.
2. **throughput**: the simulated tokens/s reaches the target.
3. **latency** (when a target is given): throughput met and the simulated step time (for
   decode, the time per output token) is within the target.

Cluster sizes are the profile's nodes × devices per node (a single node may be partly used:
1, 2, 4 … devices), kept to the sizes the placement accepts (contiguous: experts a multiple
of devices or devices a multiple of experts). The search starts at the memory answer,
doubles the device count until the target is met, then bisects between the last size that
failed and the first that passed; it assumes throughput grows with the device count.

At every size evaluated, each capacity factor of a ladder is tried on the routing alone
(the simulator's own routing step) and the smallest whose drop rate is within the target
is simulated; each available placement strategy is simulated and the fastest kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from moesim.costs.memory import contiguous_slots, memory_per_device
from moesim.errors import InputError
from moesim.hardware import HardwareProfile, get_profile
from moesim.model.shapes import ModelShape, get_preset
from moesim.scenario import Scenario
from moesim.sim.simulate import (
    ModeResult,
    Prepared,
    SimResult,
    prepare,
    route_step,
    simulate_mode,
)
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
    max_drop_rate: float = 0.001
    mode: str = "decode"
    tokens_per_device: int = 64
    sequence_length: int = 4096
    steps: int = 1
    seed: int = 0
    max_devices: int = 4096
    capacity_factors: tuple[float, ...] = CAPACITY_LADDER

    def price(self, index: int) -> float | None:
        """Price per device-hour of the ``index``-th hardware (one price applies to all)."""
        p = self.prices_per_device_hour
        if not p:
            return None
        return p[0] if len(p) == 1 else p[index]


@dataclass(frozen=True)
class Evaluation:
    """One cluster size simulated: the chosen capacity factor and placement, and the result."""

    hardware: str
    num_devices: int
    nodes: int
    devices_per_node: int
    placement: str
    capacity_factor: float
    drop_rate: float
    drop_rates: dict[float, float]  # capacity factor -> drop rate, on the routing alone
    placements_tokens_per_s: dict[str, float]
    result: SimResult = field(repr=False)

    @property
    def run(self) -> ModeResult:
        return self.result.runs[0]

    @property
    def step_time_us(self) -> float:
        return float(self.run.summary["step_time_us"])

    @property
    def tokens_per_s(self) -> float:
        return float(self.run.summary["tokens_per_s"])


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

    @property
    def recommended(self) -> Evaluation | None:
        """The configuration answering the strictest question asked."""
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
            "recommended_capacity_factor": rec.capacity_factor if rec else None,
            "recommended_placement": rec.placement if rec else None,
            "drop_rate": rec.drop_rate if rec else None,
            "tokens_per_s": rec.tokens_per_s if rec else None,
            "step_time_us": rec.step_time_us if rec else None,
            "memory_per_device_bytes": rec.run.summary["memory_per_device_bytes"] if rec else None,
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
    """Placements the planner tries at every size: Megatron's contiguous default and a
    load-balanced packing planned from the routing (EPLB-style, global, no replicas: the
    planner keeps expert memory at one copy per expert)."""
    from moesim.placement.planners import STRATEGIES

    return [p for p in ("contiguous", "eplb-global") if p in STRATEGIES]


def cluster_sizes(num_experts: int, devices_per_node: int, max_devices: int) -> list[int]:
    """Device counts to search, ascending: part of one node (powers of two dividing the node),
    then whole nodes; kept to counts contiguous placement accepts."""
    partial = [
        d for d in (1, 2, 4, 8, 16, 32) if d < devices_per_node and devices_per_node % d == 0
    ]
    whole = range(devices_per_node, max_devices + 1, devices_per_node)
    return [d for d in (*partial, *whole) if num_experts % d == 0 or d % num_experts == 0]


def min_devices_memory(
    shape: ModelShape, hw: HardwareProfile, request: PlanRequest, sizes: Sequence[int]
) -> int | None:
    """Fewest devices of ``sizes`` whose per-device memory fits in HBM, at the largest
    capacity factor of the ladder (the most activation memory the search may pick)."""
    for d in sizes:
        mem = memory_per_device(
            shape,
            num_devices=d,
            mode=request.mode,
            tokens_per_device=request.tokens_per_device,
            sequence_length=request.sequence_length,
            precision=request.precision,
            capacity_factor=max(request.capacity_factors),
            hbm_bytes=hw.memory.hbm_bytes,
            expert_slots=contiguous_slots(shape.num_experts, d),
        )
        if mem.fits:
            return d
    return None


def _sim_precision(precision: str) -> str:
    """The scenario precision the simulation runs at: int4 weights are timed as fp8 GEMMs
    (weights dequantised to fp8 on load, W4A8)."""
    return "fp8" if precision == "int4" else precision


def _drop_rate(prep: Prepared, steps: int) -> float:
    dropped = assignments = 0
    for step in range(steps):
        for lr in route_step(prep, step).values():
            dropped += int(lr.dropped.sum())
            assignments += lr.assignments
    return dropped / assignments if assignments else 0.0


def _evaluate(
    shape: ModelShape, hw_name: str, hw: HardwareProfile, request: PlanRequest, d: int
) -> Evaluation | None:
    """Simulate ``d`` devices: pick the capacity factor on routing, then each placement."""
    dpn = min(d, hw.devices_per_node)
    routing: dict[str, Any] = (
        {"trace": request.trace}
        if request.trace is not None
        else {"synthetic": {"distribution": request.distribution}}
    )
    best: Evaluation | None = None
    per_placement: dict[str, float] = {}
    for placement in available_placements():
        base = Scenario(
            name=f"plan-{shape.name}-{hw_name}-{d}",
            hardware=hw_name,
            cluster={"nodes": d // dpn, "devices_per_node": dpn},
            model=shape,
            routing=routing,
            placement=placement,
            capacity={"factor": request.capacity_factors[0], "overflow": "drop"},
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
        chosen = request.capacity_factors[-1]
        for cf in request.capacity_factors:
            sc = base.model_copy(
                update={"capacity": base.capacity.model_copy(update={"factor": cf})}
            )
            drops[cf] = _drop_rate(replace(prep, scenario=sc), request.steps)
            if drops[cf] <= request.max_drop_rate:
                chosen = cf
                break
        sc = base.model_copy(
            update={"capacity": base.capacity.model_copy(update={"factor": chosen})}
        )
        run = simulate_mode(replace(prep, scenario=sc), request.mode)
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
            capacity_factor=chosen,
            drop_rate=float(run.summary["drop_rate"]),
            drop_rates=drops,
            placements_tokens_per_s=per_placement,
            result=result,
        )
        if best is None or ev.tokens_per_s > best.tokens_per_s:
            best = ev
    return best


def _search(sizes: list[int], start: int, ok: Callable[[int], bool]) -> int | None:
    """Fewest of ``sizes[start:]`` passing ``ok``: doubling the device count from
    ``sizes[start]`` until one passes, then bisection between the last failure and it."""
    if start >= len(sizes):
        return None
    lo, i = start - 1, start  # lo: index of the last size known to fail
    while not ok(sizes[i]):
        lo = i
        if i == len(sizes) - 1:
            return None
        target = 2 * sizes[i]
        i = next((j for j in range(i + 1, len(sizes)) if sizes[j] >= target), len(sizes) - 1)
    hi = i
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(sizes[mid]):
            hi = mid
        else:
            lo = mid
    return sizes[hi]


def plan_hardware(
    request: PlanRequest,
    index: int,
    progress: Callable[[str], None] | None = None,
) -> HardwarePlan:
    """Answer the three questions for ``request.hardware[index]``."""
    hw_name = request.hardware[index]
    hw = get_profile(hw_name)
    shape = get_preset(request.model)
    sizes = cluster_sizes(shape.num_experts, hw.devices_per_node, request.max_devices)
    notes: list[str] = []
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
        return ev is not None and ev.tokens_per_s >= request.tokens_per_s

    def meets_slo(d: int) -> bool:
        ev = evaluate(d)
        assert request.latency_slo_ms is not None
        return (
            ev is not None
            and ev.tokens_per_s >= request.tokens_per_s
            and ev.step_time_us <= request.latency_slo_ms * 1e3
        )

    d_thr = d_slo = None
    if d_mem is None:
        notes.append(f"the model does not fit on up to {request.max_devices} devices")
    else:
        start = sizes.index(d_mem)
        d_thr = _search(sizes, start, meets_throughput)
        if d_thr is None:
            notes.append(f"throughput not reached on up to {request.max_devices} devices")
        elif request.latency_slo_ms is not None:
            d_slo = _search(sizes, sizes.index(d_thr), meets_slo)
            if d_slo is None:
                notes.append(f"latency target not met on up to {request.max_devices} devices")
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
    rec = plan.recommended
    if rec is not None and rec.drop_rate > request.max_drop_rate:
        notes.append(
            f"drop rate {100 * rec.drop_rate:.3f}% exceeds the target even at capacity "
            f"factor {rec.capacity_factor}"
        )
    return plan


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
    if request.tokens_per_s <= 0:
        raise InputError("must be positive", field="tokens-per-s", value=request.tokens_per_s)
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
                    **metric_values(s),
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
