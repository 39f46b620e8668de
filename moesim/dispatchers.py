"""Dispatchers: what moves token copies between devices, as a model with its sources.

A dispatcher decides four things the simulator needs about every MoE all-to-all:

* **which copies travel** (``dedup``): one per (token, expert) (``none``), per (token,
  device) (``device``), or one per (token, destination node), sent over the sender's rail
  to the device on that rail and forwarded over the scale-up fabric (``node``);
* **the dtype of each pass**: the forward dispatch and combine, and in training the two
  backward all-to-alls — the gradient of the combine travels the dispatch's way
  (``grad_dispatch_dtype``), the gradient of the dispatch the combine's way
  (``grad_combine_dtype``). fp8 copies carry one fp32 scale per 128 channels;
* **a fixed cost per call**: ``launches`` kernel launches (the hardware profile's
  ``kernel_launch_us`` each) and ``syncs`` round trips of the longest path the exchange
  crosses (a count exchange or barrier before the data moves);
* **the SMs it holds** (``sms``) while it runs: with two-microbatch overlap a device's
  GEMM-bound compute runs on what is left (:func:`compute_slowdown`).

Presets are named in a scenario (``dispatcher: deepep-normal``), with any field
overridden (``dispatcher: {preset: deepep-normal, grad_dispatch_dtype: bf16}``), and by
``moesim a2a --dispatcher NAME``. The default, ``auto``, is ``deepep-normal`` on NVIDIA
GPUs from Hopper on (the kernels DeepSeek-V3 training, SGLang and Megatron's ``flex``
dispatcher use for expert parallelism across nodes) and ``nccl-alltoallv`` elsewhere
(A100; RCCL on AMD; an XLA all-to-all on TPUs moves the same per-(token, expert) copies).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moesim.errors import InputError
from moesim.hardware import HardwareProfile

__all__ = [
    "DEFAULT_DISPATCHER",
    "PRESETS",
    "Dedup",
    "Dispatcher",
    "DispatcherChoice",
    "Wire",
    "compute_slowdown",
    "default_preset",
    "get_dispatcher",
]

Dedup = Literal["none", "device", "node"]
Wire = Literal["bf16", "fp8"]

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

#: what ``dispatcher: auto`` (the default) resolves to: see :func:`default_preset`
DEFAULT_DISPATCHER = "auto"


class Dispatcher(BaseModel):
    """One dispatcher's behaviour (see the module docstring); every figure sourced."""

    model_config = _STRICT
    name: str
    dedup: Dedup
    dispatch_dtype: Wire
    combine_dtype: Wire
    grad_dispatch_dtype: Wire = Field(description="backward of the combine (dispatch's way)")
    grad_combine_dtype: Wire = Field(description="backward of the dispatch (combine's way)")
    launches: int = Field(ge=0, description="kernel launches per dispatch or combine call")
    syncs: int = Field(ge=0, description="round trips of the exchange's longest path per call")
    sms: int = Field(ge=0, description="SMs the kernels hold while they run")
    sources: dict[str, str] = Field(default_factory=dict)

    def fixed_us(
        self, hw: HardwareProfile, path_latency_us: float, across_nodes: bool = False
    ) -> float:
        """Fixed cost of one call: its launches, its round trips of a path of one-way
        latency ``path_latency_us``, and the profile's all-to-all floor of the tier it
        crosses (``scale_out`` when ``across_nodes``, else ``scale_up``; calibrated)."""
        tier = hw.scale_out if across_nodes else hw.scale_up
        floor = tier.alltoall_floor_us or 0.0
        return self.launches * hw.kernel_launch_us + self.syncs * 2.0 * path_latency_us + floor

    def pass_dtypes(self) -> dict[str, str]:
        """Wire dtype of each of the four all-to-alls, by the program's phase name."""
        return {
            "dispatch": self.dispatch_dtype,
            "combine": self.combine_dtype,
            "combine bwd": self.grad_dispatch_dtype,
            "dispatch bwd": self.grad_combine_dtype,
        }


_DS_V3 = "DeepSeek-V3 Technical Report (arXiv 2412.19437)"
_DEEPEP = "github.com/deepseek-ai/DeepEP"

PRESETS: dict[str, Dispatcher] = {
    "deepep-normal": Dispatcher(
        name="deepep-normal",
        dedup="node",
        dispatch_dtype="fp8",
        combine_dtype="bf16",
        grad_dispatch_dtype="fp8",
        grad_combine_dtype="bf16",
        launches=2,
        syncs=1,
        sms=20,
        sources={
            "dedup": f"{_DS_V3} sec. 3.2.2: each token is sent by IB to the GPU with the "
            "same in-node index on each target node, then forwarded over NVLink; DeepEP "
            "README (normal kernels: asymmetric-domain forwarding, NVLink to RDMA)",
            "dispatch_dtype": f"{_DS_V3} sec. 3.3.3: activations before the MoE "
            "up-projections are quantised to FP8 and then dispatched",
            "combine_dtype": f"{_DS_V3} sec. 3.3.3: forward and backward combine "
            "components are retained in BF16",
            "grad_dispatch_dtype": f"{_DS_V3} sec. 3.3.3: the same FP8 strategy is applied "
            "to the activation gradient before the MoE down-projections",
            "grad_combine_dtype": f"{_DS_V3} sec. 3.3.3: backward combine retained in BF16",
            "launches": f"{_DEEPEP} deep_ep/buffer.py: a dispatch runs the layout kernel "
            "(get_dispatch_layout), notify_dispatch, then dispatch; a combine runs "
            "cached_notify then combine (two of each counted: the layout kernel is short)",
            "syncs": f"{_DEEPEP} csrc/kernels/internode.cu notify_dispatch: an NVSHMEM sync of "
            "the same-index ranks, an in-node barrier and an RDMA put of the token counts, "
            "which the CPU waits for (deep_ep.cpp) before the dispatch is launched",
            "sms": f"{_DEEPEP} deep_ep/buffer.py: Buffer.num_sms = 20 for the "
            f"high-throughput kernels; {_DS_V3} sec. 3.5.1: 20 of the H800's 132 SMs "
            "allocated to communication",
        },
    ),
    "deepep-low-latency": Dispatcher(
        name="deepep-low-latency",
        dedup="none",
        dispatch_dtype="fp8",
        combine_dtype="bf16",
        grad_dispatch_dtype="fp8",
        grad_combine_dtype="bf16",
        launches=1,
        syncs=0,
        sms=0,
        sources={
            "dedup": f"{_DEEPEP} csrc/kernels/internode_ll.cu: one IBGDA put per (token, "
            "expert) into a slot of the destination expert. In-node copies are modelled "
            "over NVLink (allow_nvlink_for_low_latency_mode); with NVLink disabled, DeepEP's "
            "older default, they would cross the NIC, which is not modelled",
            "dispatch_dtype": f"{_DEEPEP} deep_ep/buffer.py low_latency_dispatch: FP8 "
            "with per-128-channel scales by default (use_fp8=True)",
            "combine_dtype": f"{_DEEPEP} deep_ep/buffer.py low_latency_combine: BF16 input",
            "grad_dispatch_dtype": "as dispatch_dtype (the kernels serve inference; a "
            "training pass would send gradients the same way)",
            "grad_combine_dtype": "as combine_dtype",
            "launches": f"{_DEEPEP} deep_ep/buffer.py: one kernel per call (fixed-size "
            "buffers, no notify step)",
            "syncs": f"{_DEEPEP} internode_ll.cu: per-expert counts follow the tokens as "
            "atomic adds; nothing is exchanged before sending",
            "sms": f"{_DEEPEP} README: hook-based overlap (return_recv_hook) issues the "
            "RDMA requests and returns; the traffic proceeds without occupying any SM "
            "(deepseek-ai/profile-data README, decode: all GPU SMs are freed)",
        },
    ),
    "nccl-alltoallv": Dispatcher(
        name="nccl-alltoallv",
        dedup="none",
        dispatch_dtype="bf16",
        combine_dtype="bf16",
        grad_dispatch_dtype="bf16",
        grad_combine_dtype="bf16",
        launches=2,
        syncs=1,
        sms=16,
        sources={
            "dedup": "torch.distributed.all_to_all_single over tokens permuted by expert: "
            "a token routed to two experts of one rank is sent twice",
            "dispatch_dtype": "the model's activations (bf16); NCCL moves bytes as given",
            "combine_dtype": "the experts' outputs (bf16)",
            "grad_dispatch_dtype": "activation gradients (bf16)",
            "grad_combine_dtype": "activation gradients (bf16)",
            "launches": "an all-to-all of the split sizes, then the data's all-to-all-v",
            "syncs": "the split sizes must reach every rank before the data moves (one "
            "all-to-all of counts)",
            "sms": "NVIDIA/nccl issue 689, maintainer: on a DGX with 8 NICs NCCL uses 16 "
            "SMs, and NCCL's thread blocks do not share an SM with compute kernels",
        },
    ),
    "megatron-alltoall": Dispatcher(
        name="megatron-alltoall",
        dedup="none",
        dispatch_dtype="bf16",
        combine_dtype="bf16",
        grad_dispatch_dtype="bf16",
        grad_combine_dtype="bf16",
        launches=3,
        syncs=2,
        sms=16,
        sources={
            "dedup": "NVIDIA/Megatron-LM megatron/core/transformer/moe/token_dispatcher.py, "
            "MoEAlltoAllTokenDispatcher: dropless num_out_tokens = tokens x topk, tokens "
            "permuted (one row per (token, expert)) and exchanged by all_to_all over the "
            "EP group",
            "dispatch_dtype": "token_dispatcher.py: the hidden states in the model's dtype (bf16)",
            "combine_dtype": "bf16 (the experts' outputs)",
            "grad_dispatch_dtype": "bf16 (autograd of the all_to_all)",
            "grad_combine_dtype": "bf16 (autograd of the all_to_all)",
            "launches": "token_dispatcher.py: the split sizes' all-to-all, the tokens' "
            "all-to-all and the routing probabilities' all-to-all",
            "syncs": "token_dispatcher.py: the split sizes' all-to-all, then a "
            "device-to-host copy of them (cuda_sync_point before_ep_alltoall)",
            "sms": "as nccl-alltoallv: NVIDIA/nccl issue 689, 16 SMs on an 8-NIC node",
        },
    ),
}


def default_preset(hw: HardwareProfile) -> str:
    """``auto``'s dispatcher: ``deepep-normal`` on NVIDIA GPUs with FP8 tensor units
    (Hopper and later, the GPUs DeepEP's README names and its FP8 dispatch needs),
    ``nccl-alltoallv`` else (A100, AMD, TPU)."""
    hopper_or_later = hw.compute.fp8_dense_tflops is not None
    nvidia = hw.kind == "gpu" and hw.vendor.upper() == "NVIDIA"
    return "deepep-normal" if nvidia and hopper_or_later else "nccl-alltoallv"


class DispatcherChoice(BaseModel):
    """A scenario's ``dispatcher``: a preset, and any of its fields overridden."""

    model_config = _STRICT
    preset: str = DEFAULT_DISPATCHER
    dedup: Dedup | None = None
    dispatch_dtype: Wire | None = None
    combine_dtype: Wire | None = None
    grad_dispatch_dtype: Wire | None = None
    grad_combine_dtype: Wire | None = None
    launches: int | None = Field(default=None, ge=0)
    syncs: int | None = Field(default=None, ge=0)
    sms: int | None = Field(default=None, ge=0)

    def resolve(self, hw: HardwareProfile) -> Dispatcher:
        """The preset (``auto``: :func:`default_preset`) with the overrides applied."""
        base = get_dispatcher(default_preset(hw) if self.preset == "auto" else self.preset)
        changes = self.model_dump(exclude={"preset"}, exclude_none=True)
        if not changes:
            return base
        sources = dict(base.sources)
        for key in changes:
            sources[key] = "set in the scenario"
        return base.model_copy(update={**changes, "sources": sources})


def get_dispatcher(name: str) -> Dispatcher:
    """The preset called ``name``."""
    if name not in PRESETS:
        raise InputError(
            f"unknown dispatcher; valid: auto, {', '.join(PRESETS)}", field="dispatcher", value=name
        )
    return PRESETS[name]


def compute_slowdown(hw: HardwareProfile, dispatcher: Dispatcher) -> float:
    """Factor on GEMM-bound compute while the dispatcher runs beside it: the SMs there are
    over those left, ``sm_count / (sm_count - sms)`` (1 where the profile has no SM count),
    times ``1 + efficiency.comm_interference`` (the memory and cache traffic it adds)."""
    n = hw.compute.sm_count
    interference = 1.0 + (hw.efficiency.comm_interference or 0.0)
    if n is None or dispatcher.sms == 0:
        return interference
    if dispatcher.sms >= n:
        raise InputError(
            f"the dispatcher holds every one of the {n} SMs of {hw.name}",
            field="dispatcher.sms",
            value=dispatcher.sms,
        )
    return n / (n - dispatcher.sms) * interference
