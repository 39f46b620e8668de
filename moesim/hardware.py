"""Hardware profiles: one YAML file per device or system under ``hardware_profiles/``.

Every figure in a profile carries its source in ``sources`` (keyed by the figure's
dotted path, e.g. ``compute.bf16_dense_tflops``); validation rejects a profile
with an unsourced figure, a non-positive figure or an unknown field.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesim.errors import InputError
from moesim.paths import hardware_dir
from moesim.yamlio import load_yaml_model

__all__ = [
    "MAX_FACTOR",
    "MIN_EFFICIENCY",
    "Calibration",
    "Compute",
    "Efficiency",
    "HardwareProfile",
    "Memory",
    "ScaleOut",
    "ScaleUp",
    "get_profile",
    "list_profiles",
    "load_profile",
]

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

#: the smallest fraction of a peak a profile may claim: 0.1 %. Far below any real kernel's
#: (GEMMs reach 30-90 %, links 50-95 %), and it keeps every time the cost model derives
#: finite (an efficiency of 1e-300 made step times infinite)
MIN_EFFICIENCY = 1e-3
#: the slowest throughput and bandwidth a profile may claim (1 GFLOP/s, 1 MB/s): for the
#: same reason
MIN_RATE = 1e-3
#: the longest fixed time a profile may claim for a launch, a latency or a floor: 1 s
MAX_FIXED_US = 1e6
#: the largest slowdown factor (expert backward over forward, interference beside
#: communication) a profile may claim
MAX_FACTOR = 100.0
#: the largest ``gemm_half_outputs`` a profile may claim (a GEMM of 10^15 output elements)
MAX_HALF_OUTPUTS = 1e15


class Compute(BaseModel):
    model_config = _STRICT
    bf16_dense_tflops: float = Field(
        ge=MIN_RATE, description="Dense BF16 tensor throughput, TFLOP/s"
    )
    fp8_dense_tflops: float | None = Field(
        default=None,
        ge=MIN_RATE,
        description="Dense FP8 tensor throughput, TFLOP/s (None: no FP8 units)",
    )
    int8_dense_tops: float | None = Field(
        default=None, ge=MIN_RATE, description="Dense INT8, TOP/s"
    )
    sm_count: int | None = Field(
        default=None,
        gt=0,
        description="Streaming multiprocessors (NVIDIA) or compute units (AMD); None: not "
        "modelled (communication kernels then take no compute from the device)",
    )


class Memory(BaseModel):
    model_config = _STRICT
    hbm_bytes: int = Field(gt=0, description="HBM capacity per device, bytes")
    hbm_bandwidth_gbps: float = Field(ge=MIN_RATE, description="HBM bandwidth per device, GB/s")


class _Tier(BaseModel):
    """What the scale-up and scale-out fabrics share."""

    model_config = _STRICT
    alltoall_floor_us: float | None = Field(
        default=None,
        ge=0,
        le=MAX_FIXED_US,
        description="time of one MoE all-to-all call across this tier that does not grow "
        "with its bytes, beyond the path's latency and the dispatcher's launches and round "
        "trips (a floor moesim calibrate fits: synchronisation with late peers); None: 0",
    )


class ScaleUp(_Tier):
    """The fast fabric inside a scale-up domain (NVLink/NVSwitch, Infinity Fabric, TPU ICI)."""

    model_config = _STRICT
    kind: str = Field(description="e.g. nvlink4-nvswitch, infinity-fabric, tpu-ici")
    topology: Literal["nvswitch", "full-mesh", "torus-2d", "torus-3d"]
    bandwidth_gbps: float = Field(ge=MIN_RATE, description="Per device, per direction, GB/s")
    domain_size: int = Field(gt=0, description="Devices in one scale-up domain")
    links_per_device: int = Field(gt=0)
    latency_us: float = Field(
        gt=0, le=MAX_FIXED_US, description="One-way latency of a small message"
    )


class ScaleOut(_Tier):
    """The network between scale-up domains (InfiniBand/RoCE NICs, TPU DCN)."""

    model_config = _STRICT
    kind: str
    bandwidth_gbps: float = Field(ge=MIN_RATE, description="Per device, per direction, GB/s")
    latency_us: float = Field(gt=0, le=MAX_FIXED_US)


class Efficiency(BaseModel):
    """Achievable fraction of each peak, used by the roofline cost model."""

    model_config = _STRICT
    gemm: float = Field(
        ge=MIN_EFFICIENCY, le=1, description="large GEMMs' fraction of the dense peak"
    )
    hbm: float = Field(ge=MIN_EFFICIENCY, le=1)
    scale_up: float = Field(ge=MIN_EFFICIENCY, le=1)
    scale_out: float = Field(ge=MIN_EFFICIENCY, le=1)
    gemm_half_outputs: float | None = Field(
        default=None,
        ge=0,
        le=MAX_HALF_OUTPUTS,
        description="output elements (M x N, over a grouped call's experts) at which a "
        "GEMM's arithmetic takes twice its large-batch time, too few tiles to fill the "
        "device: t = flops x (M N + H) / (M N x peak x gemm); None: 0",
    )
    gemm_fp8: float | None = Field(
        default=None,
        ge=MIN_EFFICIENCY,
        le=1,
        description="FP8 GEMMs' fraction of the FP8 peak; None: gemm",
    )
    gemm_fp8_half_outputs: float | None = Field(
        default=None,
        ge=0,
        le=MAX_HALF_OUTPUTS,
        description="gemm_half_outputs of FP8 GEMMs; None: gemm_half_outputs",
    )
    attention: float | None = Field(
        default=None,
        ge=MIN_EFFICIENCY,
        le=1,
        description="attention-score kernels' (FlashAttention's) fraction of the dense peak; "
        "None: gemm",
    )
    comm_interference: float | None = Field(
        default=None,
        ge=0,
        le=MAX_FACTOR,
        description="extra slowdown of compute while a communication kernel runs beside it "
        "(memory and cache traffic), on top of the SMs it holds; None: 0",
    )
    expert_backward: float | None = Field(
        default=None,
        gt=0,
        le=MAX_FACTOR,
        description="expert FFN backward time over its forward time; None: 2 (the FLOP ratio)",
    )

    def gemm_factors(self, fp8: bool) -> tuple[float, float]:
        """(efficiency, half outputs) of a GEMM, FP8 or not; an FP8 figure left unset
        takes the GEMMs' one."""
        eff, half = self.gemm, self.gemm_half_outputs or 0.0
        if fp8:
            eff = self.gemm_fp8 if self.gemm_fp8 is not None else eff
            half = self.gemm_fp8_half_outputs if self.gemm_fp8_half_outputs is not None else half
        return eff, half


class Calibration(BaseModel):
    """Where a derived profile's fitted figures came from (``moesim calibrate``)."""

    model_config = _STRICT
    base: str = Field(description="the profile it was derived from")
    trace: str = Field(description="the profiler trace's file name")
    trace_sha256: str
    scenario: str = Field(description="the scenario whose configuration the trace ran")
    fitted_on: str = Field(description="which of the trace's calls the fit used")
    changed: dict[str, list[float | None]] = Field(
        description="figure -> [value before, value after]"
    )


class HardwareProfile(BaseModel):
    model_config = _STRICT
    name: str
    vendor: str
    kind: Literal["gpu", "tpu"]
    devices_per_node: int = Field(gt=0, description="Accelerators per host/node")
    compute: Compute
    memory: Memory
    scale_up: ScaleUp
    scale_out: ScaleOut
    efficiency: Efficiency
    kernel_launch_us: float = Field(
        gt=0, le=MAX_FIXED_US, description="Fixed cost of one kernel launch"
    )
    kernel_tables: str | None = Field(
        default=None, description="Folder under kernels/measured/ with this device's timings"
    )
    sources: dict[str, str]
    calibration: Calibration | None = Field(
        default=None, description="set on a profile derived by moesim calibrate"
    )

    @model_validator(mode="after")
    def _every_figure_sourced(self) -> HardwareProfile:
        missing = [p for p in self.figure_paths() if p not in self.sources]
        if missing:
            raise ValueError(f"figure '{missing[0]}' has no entry in 'sources'")
        unknown = [k for k in self.sources if k not in self.figure_paths()]
        if unknown:
            raise ValueError(f"'sources' names '{unknown[0]}', which is not a figure")
        return self

    def figure_paths(self) -> list[str]:
        """Dotted paths of every numeric figure that is set."""
        out = []
        for section in ("compute", "memory", "scale_up", "scale_out", "efficiency"):
            block = getattr(self, section)
            for key, val in block.model_dump().items():
                if isinstance(val, int | float) and not isinstance(val, bool):
                    out.append(f"{section}.{key}")
        out += ["devices_per_node", "kernel_launch_us"]
        return out

    def peak_tflops(self, dtype: str) -> float:
        """Dense tensor throughput for a compute dtype; fp8 falls back to bf16 without FP8 units."""
        if self.runs_fp8(dtype):
            assert self.compute.fp8_dense_tflops is not None
            return self.compute.fp8_dense_tflops
        return self.compute.bf16_dense_tflops

    def runs_fp8(self, dtype: str) -> bool:
        """Whether GEMMs in ``dtype`` run on the FP8 tensor units (which it has)."""
        return dtype in ("fp8", "int4", "int8") and self.compute.fp8_dense_tflops is not None


def list_profiles() -> list[str]:
    """Names of the bundled hardware profiles, sorted."""
    return sorted(p.stem for p in hardware_dir().glob("*.yaml"))


def load_profile(path: Path) -> HardwareProfile:
    """Load and validate one profile file."""
    return load_yaml_model(path, HardwareProfile)


@cache
def get_profile(name: str) -> HardwareProfile:
    """The bundled profile called ``name`` (file stem, case-insensitive), or the profile
    file at ``name`` when it is a path ending in ``.yaml``/``.yml``."""
    if name.endswith((".yaml", ".yml")):
        return load_profile(Path(name))
    names = {n.lower(): n for n in list_profiles()}
    if name.lower() not in names:
        raise InputError(
            f"unknown hardware profile; valid names: {', '.join(list_profiles())}",
            field="hardware",
            value=name,
        )
    return load_profile(hardware_dir() / f"{names[name.lower()]}.yaml")
