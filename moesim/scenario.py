"""Scenario files: one YAML describing a model on a cluster, its routing and what to simulate.

Example (``scenarios/demo.yaml``)::

    name: demo
    hardware: H100-SXM
    cluster: {nodes: 2, devices_per_node: 8}
    model: moesim-reference
    routing: {trace: traces/moesim-reference}
    placement: greedy
    redundant_slots: 16
    capacity: {factor: null}       # dropless (the default): unlimited expert capacity
    mode: [training, prefill]
    tokens_per_device: 2048        # decode: sequences per device, one new token each
    dispatcher: auto               # deepep-normal on Hopper+; {preset: NAME, field: value}
    seed: 0

Relative paths are resolved against the scenario file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moesim.dispatchers import DEFAULT_DISPATCHER, PRESETS, DispatcherChoice
from moesim.errors import InputError
from moesim.model.shapes import ModelShape

__all__ = [
    "FLOW_REL_TOL",
    "HOT_DEVICE",
    "Capacity",
    "Cluster",
    "Mode",
    "Network",
    "Routing",
    "Scenario",
    "Stragglers",
    "SyntheticRouting",
    "load_scenario",
    "load_scenario_with_hardware",
]

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

#: the flow tier's default tolerance: one exchange's device times within about 2 % of
#: exact on skewed exchanges of 32 to 128 devices (``tests/test_topology_flows.py`` checks
#: it), a 32-device training step within 0.3 %, at a small fraction of the cost
FLOW_REL_TOL = 0.01

#: node granularity's default: a device whose bytes per unit of NIC, received or sent,
#: exceed its node's mean by this factor keeps a device flow with each peer that way (its
#: own NIC the limit) instead of the node's pooled port
#: (``benchmarks/flow_granularity.py --hot`` measures it)
HOT_DEVICE = 1.1

Mode = Literal["training", "prefill", "decode"]
Precision = Literal["bf16", "fp8"]


class Cluster(BaseModel):
    model_config = _STRICT
    nodes: int = Field(gt=0)
    devices_per_node: int = Field(gt=0)

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node


class SyntheticRouting(BaseModel):
    model_config = _STRICT
    distribution: str = Field(
        default="uniform", description="uniform | zipf:S | dirichlet:A | drift:s=S,speed=V | ..."
    )
    seed: int | None = Field(default=None, ge=0, description="None: the scenario's seed")
    level: Literal["auto", "token", "count"] = Field(
        default="auto",
        description="token: draw every token's experts; count: draw each device's per-expert "
        "counts directly (for large clusters; drop overflow and no de-duplication only); "
        "auto: count where the scenario needs no token identity (moesim.sim.prepare."
        "routing_level), else token; the run's summary states which ran and why",
    )

    @field_validator("distribution")
    @classmethod
    def _known(cls, v: str) -> str:
        from moesim.traces.synthetic import parse_distribution

        try:
            parse_distribution(v)
        except InputError as err:
            raise ValueError(err.message) from None
        return v


class Routing(BaseModel):
    """Where routing comes from: a trace folder, or synthetic routing with a seed."""

    model_config = _STRICT
    trace: Path | None = None
    synthetic: SyntheticRouting | None = None
    layer_map: Literal["cycle"] | list[int] | None = Field(
        default=None,
        description="a trace with other MoE layers than the model: 'cycle' replays trace "
        "layer i mod L on MoE layer i; a list names the trace layer (its own number) each "
        "MoE layer replays; None: one trace layer per MoE layer, in order",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Routing:
        if (self.trace is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'trace' or 'synthetic'")
        if self.layer_map is not None and self.trace is None:
            raise ValueError("layer_map maps a trace's layers: give 'trace'")
        return self


class Capacity(BaseModel):
    """Expert capacity per physical slot: ``ceil(factor * assignments in the layer step /
    physical slots)`` (:mod:`moesim.placement.capacity`), so a replica adds capacity; the
    default ``factor: null`` is dropless (unlimited), as serving and modern training run."""

    model_config = _STRICT
    factor: float | None = Field(default=None, gt=0, description="None: unlimited capacity")
    overflow: Literal["drop", "reroute"] = "drop"


class Network(BaseModel):
    """How all-to-alls are timed: port-limited (``analytic``) or flows sharing links (``flow``)."""

    model_config = _STRICT
    tier: Literal["analytic", "flow"] = "analytic"
    oversubscription: float = Field(default=1.0, ge=1.0, description="fat-tree leaf down/up ratio")
    nodes_per_leaf: int | None = Field(default=None, gt=0)
    granularity: Literal["device", "rail", "node", "auto"] = Field(
        default="auto",
        description="flow tier: a flow per device pair (device); DeepEP's path, a device's "
        "traffic to another node as one flow over its rail, forwarded inside the node (rail); "
        "one flow per node pair onto the nodes' NICs pooled as one port (node); device up to "
        "65,536 device pairs (256 devices) and node beyond (auto)",
    )
    hot_device: float = Field(
        default=HOT_DEVICE,
        ge=1.0,
        description="node granularity: devices with more bytes per unit of NIC, received or "
        "sent, than this x their node's mean keep a flow with each peer that way (lower: "
        "closer to device flows, slower)",
    )
    flow_rel_tol: float = Field(
        default=FLOW_REL_TOL,
        ge=0.0,
        le=0.2,
        description="flow tier: finishes and saturations this close (relative to the "
        "exchange's clock) are batched, releases rounded up to this fraction of its port "
        "time; 0 is exact, 0.01 kept a 32-device step within 0.3 % at a fifth of the cost",
    )


class Stragglers(BaseModel):
    """Injected slowness: slow devices, seeded jitter on compute, degraded NICs."""

    model_config = _STRICT
    slow_devices: dict[int, float] = Field(
        default_factory=dict, description="device -> compute time factor, e.g. {5: 1.3}"
    )
    jitter: float = Field(default=0.0, ge=0, description="log-normal spread of compute times")
    degraded_nics: dict[int, float] = Field(
        default_factory=dict, description="device -> NIC bandwidth factor, e.g. {3: 0.5}"
    )

    @field_validator("slow_devices")
    @classmethod
    def _slower(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {d: f for d, f in v.items() if f < 1 or d < 0}
        if bad:
            raise ValueError(
                f"devices must be >= 0 and compute time factors >= 1 (slower), got {bad}"
            )
        return v

    @field_validator("degraded_nics")
    @classmethod
    def _degraded(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {d: f for d, f in v.items() if not 0 < f <= 1 or d < 0}
        if bad:
            raise ValueError(
                f"devices must be >= 0 and bandwidth factors in (0, 1] (degraded), got {bad}"
            )
        return v


class Scenario(BaseModel):
    model_config = _STRICT
    name: str = "scenario"
    hardware: str
    cluster: Cluster
    model: str | ModelShape
    routing: Routing
    placement: str = Field(
        default="contiguous",
        description="a planner (contiguous | round-robin | greedy | eplb-hierarchical | "
        "eplb-global | balanced-hierarchical | balanced-global | shadow | affinity), planned "
        "from the routing's loads (eplb-hierarchical with one expert group per node where the "
        "nodes divide the experts, else EPLB's global policy), "
        "or a placement YAML file",
    )
    redundant_slots: int = Field(default=0, ge=0, description="extra expert slots per layer")
    replica_choice: Literal["nearest", "round-robin", "least-loaded", "batch-split"] = "nearest"
    capacity: Capacity = Capacity()
    network: Network = Network()
    stragglers: Stragglers = Stragglers()
    overlap: bool = Field(
        default=False,
        description="two microbatches per step, one's transfers overlapping the other's compute",
    )
    mode: Mode | list[Mode] = "training"
    tokens_per_device: int = Field(
        gt=0,
        description="Tokens each device feeds into a layer per step. In decode: sequences "
        "per device (a decode step adds one new token to each, so also tokens per step), "
        "each holding sequence_length tokens of KV cache",
    )
    sequence_length: int = Field(default=4096, gt=0, description="Tokens per sequence")
    precision: Precision = "bf16"
    dispatcher: DispatcherChoice = Field(
        default=DispatcherChoice(),
        description="what moves tokens (moesim.dispatchers): a preset name, or {preset: "
        "NAME, field: value...} overriding its dedup, per-pass dtypes, launches, syncs, "
        "sms; auto: deepep-normal on NVIDIA GPUs from Hopper on, nccl-alltoallv elsewhere",
    )
    steps: int = Field(default=1, gt=0)
    seed: int = Field(default=0, ge=0, description="Seed of every random choice the scenario makes")

    @field_validator("mode")
    @classmethod
    def _modes_nonempty(cls, v: Mode | list[Mode]) -> Mode | list[Mode]:
        if isinstance(v, list) and not v:
            raise ValueError("list of modes is empty")
        return v

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: object) -> object:
        """Fields that moved into ``dispatcher``: say where, rather than "extra field"."""
        if not isinstance(data, dict):
            return data
        net = data.get("network")
        moved = [k for k in ("dispatch_dtype", "combine_dtype") if k in data]
        if isinstance(net, dict) and "dedup" in net:
            moved.append("network.dedup")
        if moved:
            name = moved[0].removeprefix("network.")
            raise ValueError(
                f"'{moved[0]}' moved into the dispatcher: write 'dispatcher: {{preset: "
                f"{DEFAULT_DISPATCHER}, {name}: ...}}' (see docs/kernels-and-network.md)"
            )
        return data

    @field_validator("dispatcher", mode="before")
    @classmethod
    def _preset_name(cls, v: object) -> object:
        if isinstance(v, str):
            v = {"preset": v}
        if isinstance(v, dict) and v.get("preset", DEFAULT_DISPATCHER) not in (
            DEFAULT_DISPATCHER,
            *PRESETS,
        ):
            raise ValueError(f"unknown preset; valid: {DEFAULT_DISPATCHER}, {', '.join(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _even_for_overlap(self) -> Scenario:
        if self.overlap and self.tokens_per_device % 2:
            raise ValueError(
                "overlap splits tokens_per_device into two microbatches: use an even number"
            )
        return self

    @field_validator("placement")
    @classmethod
    def _planner_or_file(cls, v: str) -> str:
        from moesim.placement.planners import STRATEGIES

        if v not in STRATEGIES and not v.endswith((".yaml", ".yml")):
            raise ValueError(f"expected one of {', '.join(STRATEGIES)} or a .yaml file")
        return v

    @property
    def modes(self) -> list[Mode]:
        return list(self.mode) if isinstance(self.mode, list) else [self.mode]


def load_scenario(path: str | Path) -> tuple[Scenario, Path]:
    """Load and validate a scenario file; returns it and the folder relative paths start from."""
    from moesim.yamlio import load_yaml_model

    path = Path(path)
    return load_yaml_model(path, Scenario), path.resolve().parent


def load_scenario_with_hardware(
    path: str | Path, hardware: str | None = None
) -> tuple[Scenario, Path]:
    """The scenario at ``path`` (as :func:`load_scenario`), its hardware replaced by
    ``hardware`` when given: a profile name, or a profile file relative to the working
    folder."""
    scenario, base = load_scenario(path)
    if hardware is not None:
        if hardware.endswith((".yaml", ".yml")):
            hardware = str(Path(hardware).resolve())
        scenario = scenario.model_copy(update={"hardware": hardware})
    return scenario, base
