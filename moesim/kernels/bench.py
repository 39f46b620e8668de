"""Micro-benchmarks of the kernels of one MoE layer, in torch, on CPU or CUDA.

Ops (the ``op`` column of the tables; ``tokens`` is what the sweep varies):

==================== ===========================================================================
op                   what runs (``tokens`` = T)
==================== ===========================================================================
router               ``x (T, d_model) @ W_r.T (d_model, E)``, softmax (sigmoid for DeepSeek-V3),
                     top-k; E = the model's routed experts
permute              argsort of the (T, top_k) expert ids (stable), bincount, ``index_select``
                     of the T x top_k rows by expert
expert_ffn_loop      SwiGLU FFN of ``num_experts`` local experts, T tokens *each*, one
                     ``x @ W13.T`` / ``silu(g) * u`` / ``@ W2.T`` per expert in a Python loop
                     (fp8 on CUDA: ``torch._scaled_mm`` per expert, per-tensor scales)
expert_ffn_bmm       the same as two ``torch.bmm`` over the experts (equal tokens per expert)
expert_ffn_grouped   the same as two ``torch.nn.functional.grouped_mm`` with ``offs`` (the
                     grouped-GEMM API that also takes unequal counts)
unpermute            weighted scatter-add of the T x top_k expert outputs back to T rows
                     (``index_add_``), gate weights applied
attention            QKV projection (MLA: the low-rank down/up projections), causal
                     ``scaled_dot_product_attention`` over a sequence of T tokens, output
                     projection
memcpy               device-to-device copy of a (T, d_model) tensor (``dst.copy_(src)``)
==================== ===========================================================================

Method: the sweep runs ``rounds`` times over; in each round, weights are made once per
(shape, op, dtype) series and inputs once per point, from a seeded generator; each point
runs ``warmup`` calls, then as many timed calls as fit its
round's share of ``budget_s`` (between ``min_repeats`` and ``max_repeats``, also shared),
each timed alone (``time.perf_counter`` on CPU, CUDA events on GPU), with Python's
garbage collector off. The table keeps the median of the rounds' medians, and the p10,
p90 and min of every call. ``torch.set_num_threads`` is fixed
for the run and recorded; denormals are flushed on CPU. On CPU with glibc, freed memory
stays in the process for the run (see :func:`_kept_heap`), as the CUDA caching allocator
keeps it on GPU: otherwise every call of an op whose buffers pass glibc's mmap threshold
(at most 32 MiB) maps fresh pages and pays a zero-filling page fault per 4 KiB page,
10-20x the kernel's own time on this project's CPU. Work is capped: a point whose
estimated memory exceeds ``max_bytes`` is skipped, and once a point's fastest call exceeds
``max_call_us`` the larger token counts of that series are skipped (both recorded in
``meta.json`` under ``skipped``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from moesim.costs.work import FFN_OPS, BenchShape, op_work, table_widths
from moesim.errors import InputError
from moesim.kernels.tables import (
    TABLE_COLUMNS,
    device_slug,
    load_table,
    write_meta,
    write_op_table,
)
from moesim.model.shapes import ModelShape, get_preset

if TYPE_CHECKING:
    import torch

__all__ = [
    "CPU_MODELS",
    "DTYPES",
    "OPS",
    "SWEEP_TOKENS",
    "BenchConfig",
    "BenchResult",
    "default_config",
    "device_name",
    "measured_dir",
    "run_bench",
    "supported",
    "write_results",
]

OPS: tuple[str, ...] = (
    "router",
    "permute",
    "expert_ffn_loop",
    "expert_ffn_bmm",
    "expert_ffn_grouped",
    "unpermute",
    "attention",
    "memcpy",
)
"""Benchmarked ops, in run order."""

DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp8")

SWEEP_TOKENS: tuple[int, ...] = tuple(2**i for i in range(15))
"""Tokens swept by a full run: 1, 2, 4, ..., 16384."""

CPU_MODELS: tuple[str, ...] = (
    "FLAME-MoE-290M",
    "OLMoE-1B-7B",
    "DeepSeekMoE-16B",
    "Qwen2-57B-A14B",
    "Mixtral-8x7B",
    "Mixtral-8x22B",
    "DeepSeek-V2",
    "DeepSeek-V3",
)
"""Model presets whose shapes a full run measures: eight, so that a shape held out of a
calibration has measured neighbours on both sides in most widths."""

Device = Literal["cpu", "cuda"]

# warm-up calls, repeats, measured seconds per point, and the caps, per (device, quick)
_TIMING: dict[tuple[str, bool], dict[str, Any]] = {
    ("cpu", False): dict(
        warmup=2,
        min_repeats=5,
        max_repeats=1000,
        budget_s=0.4,
        max_call_us=5e5,
        max_bytes=2.5e9,
        rounds=5,
    ),
    ("cpu", True): dict(
        warmup=1, min_repeats=3, max_repeats=20, budget_s=0.02, max_call_us=1e5, max_bytes=5e8
    ),
    ("cuda", False): dict(
        warmup=5,
        min_repeats=10,
        max_repeats=500,
        budget_s=0.2,
        max_call_us=2e5,
        max_bytes=3e10,
        rounds=3,
    ),
    ("cuda", True): dict(
        warmup=3, min_repeats=5, max_repeats=50, budget_s=0.02, max_call_us=5e4, max_bytes=4e9
    ),
}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long to spend on it (see :func:`default_config`)."""

    device: Device
    shapes: tuple[BenchShape, ...]
    dtypes: tuple[str, ...]
    tokens: tuple[int, ...]
    ops: tuple[str, ...] = OPS
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 200
    budget_s: float = 0.25
    max_call_us: float = 500_000.0
    max_bytes: float = 1.5e9
    threads: int | None = None
    seed: int = 0
    quick: bool = False
    rounds: int = 1


@dataclass
class BenchResult:
    """Measured rows (columns of :data:`~moesim.kernels.tables.TABLE_COLUMNS`) and run facts."""

    rows: pd.DataFrame
    skipped: list[dict[str, Any]]
    meta: dict[str, Any]
    wall_s: float = 0.0
    files: list[Path] = field(default_factory=list)


def default_config(
    device: Device = "cpu",
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    threads: int | None = None,
) -> BenchConfig:
    """The full sweep (or ``quick``: a short subset for a smoke test) for a device.

    CPU full: the shapes of :data:`CPU_MODELS` (or
    ``models``), up to 4 local experts (see :func:`_local_experts`), fp32 and bf16, tokens
    1..16384, 5 rounds; a point whose fastest call takes over 0.5 s ends its series. CUDA
    full: the same shapes, 8 local experts, bf16 and fp8, 3 rounds; 0.2 s ends a series.
    Quick: FLAME-MoE-290M only (or ``models``), tokens 1, 16, 256 and few repeats.
    """
    if quick:
        names = tuple(models) if models else ("FLAME-MoE-290M",)
        tokens: tuple[int, ...] = (1, 16, 256)
    else:
        names = tuple(models) if models else CPU_MODELS
        tokens = SWEEP_TOKENS
    shapes = tuple(
        BenchShape.from_model(m, _local_experts(m, device)) for m in map(get_preset, names)
    )
    dtypes = ("fp32", "bf16") if device == "cpu" else ("bf16", "fp8")
    timing = _TIMING[(device, quick)]
    return BenchConfig(
        device=device,
        shapes=shapes,
        dtypes=dtypes,
        tokens=tokens,
        threads=threads,
        quick=quick,
        **timing,
    )


def _local_experts(shape: ModelShape, device: Device) -> int:
    """Experts per device in the FFN ops: 8 on CUDA; on CPU up to 4, with their fp32
    weights kept under 1 GB (Mixtral-8x7B: 1 expert of 0.7 GB, DeepSeek-V3: 4 of 0.18 GB)."""
    if device == "cuda":
        return min(8, shape.num_experts)
    fp32_bytes = 4 * shape.ffn_matrices * shape.d_model * shape.expert_d_ff
    return max(1, min(4, shape.num_experts, int(1e9 // fp32_bytes)))


# ----- device facts ---------------------------------------------------------------------------
def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":  # pragma: no cover - macOS
        import subprocess

        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            if out:
                return out
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: Device) -> str:
    """The CPU model string (``/proc/cpuinfo``, else ``platform``) or the CUDA device name."""
    if device == "cuda":
        _require_cuda()
        import torch

        return str(torch.cuda.get_device_name(0))
    return _cpu_model_name()


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise InputError(
            f"no CUDA device available (torch {torch.__version__}); use --device cpu",
            field="device",
            value="cuda",
        )


def supported(op: str, dtype: str, device: Device) -> str | None:
    """``None`` if ``op`` runs in ``dtype`` on ``device``, else the reason it does not."""
    if op not in OPS:
        return f"unknown op {op!r}"
    if dtype not in DTYPES:
        return f"unknown dtype {dtype!r}"
    if dtype == "fp8":
        if device != "cuda":
            return "fp8 is benchmarked on CUDA only"
        if op != "expert_ffn_loop":
            return "fp8 is benchmarked for expert_ffn_loop only (torch._scaled_mm)"
        import torch

        if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(0) < (8, 9):
            return "fp8 GEMM needs torch._scaled_mm and compute capability >= 8.9"
    return None


# ----- builders -------------------------------------------------------------------------------
@dataclass
class _Ctx:
    torch: Any
    device: str
    dtype: Any  # torch dtype of activations and weights (fp8: bf16 activations)
    gen: Any
    weights: dict[str, Any] = field(default_factory=dict)
    layout: np.random.Generator | None = None  # draws the pads (None: no pads)
    pads: list[Any] = field(default_factory=list)

    def randn(self, *shape: int, scale: float = 1.0, dtype: Any = None) -> torch.Tensor:
        if self.layout is not None:
            # a pad of a seeded random size (64-byte steps below 64 KiB), held as long as
            # the context, before each input: the relative placement of a call's buffers
            # (4 KiB aliasing, cache sets) then differs from round to round
            size = int(self.layout.integers(0, 1024)) * 64
            self.pads.append(self.torch.empty(size, dtype=self.torch.uint8, device=self.device))
        t = self.torch.randn(
            *shape, generator=self.gen, device=self.device, dtype=self.torch.float32
        )
        return (t * scale).to(dtype or self.dtype)


def _routing(ctx: _Ctx, tokens: int, experts: int, k: int) -> tuple[Any, Any]:
    """Random top-k expert ids (distinct per token) and gate weights, (T, k) each."""
    torch = ctx.torch
    scores = torch.rand(tokens, experts, generator=ctx.gen, device=ctx.device)
    w, ids = scores.topk(k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).to(ctx.dtype)


def _ffn_weights(ctx: _Ctx, s: BenchShape, fp8: bool) -> tuple[Any, Any]:
    key = "ffn_fp8" if fp8 else "ffn"
    if key not in ctx.weights:
        n, d, f = s.local_experts, s.d_model, s.d_ff
        w13 = ctx.randn(n, 2 * f, d, scale=d**-0.5)  # (E, 2F, D): nn.Linear layout
        w2 = ctx.randn(n, d, f, scale=f**-0.5)  # (E, D, F)
        if fp8:
            w13, w2 = w13.to(ctx.torch.float8_e4m3fn), w2.to(ctx.torch.float8_e4m3fn)
        ctx.weights[key] = (w13, w2)
    return ctx.weights[key]


def _build(op: str, s: BenchShape, tokens: int, dtype: str, ctx: _Ctx) -> Callable[[], Any]:
    torch = ctx.torch
    F = torch.nn.functional
    t, d, k = tokens, s.d_model, s.top_k
    if op == "router":
        if "router" not in ctx.weights:
            ctx.weights["router"] = ctx.randn(s.num_experts, d, scale=d**-0.5)
        w_r, x = ctx.weights["router"], ctx.randn(t, d)
        sigmoid = s.router_score == "sigmoid"

        def router() -> Any:
            logits = x @ w_r.t()  # (T, E)
            scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
            return scores.topk(k, dim=-1)

        return router
    if op in ("permute", "unpermute"):
        ids, gates = _routing(ctx, t, s.num_experts, k)
        flat = ids.reshape(-1)
        if op == "permute":
            x = ctx.randn(t, d)

            def permute() -> Any:
                order = torch.argsort(flat, stable=True)  # (T*k,)
                counts = torch.bincount(flat, minlength=s.num_experts)
                return x.index_select(0, order // k), counts  # (T*k, D)

            return permute
        order = torch.argsort(flat, stable=True)
        src = order // k
        y = ctx.randn(t * k, d)  # expert outputs in expert order

        def unpermute() -> Any:
            out = torch.zeros(t, d, device=ctx.device, dtype=ctx.dtype)
            w = gates.reshape(-1).index_select(0, order).unsqueeze(1)  # (T*k, 1)
            return out.index_add_(0, src, y * w)  # (T, D)

        return unpermute
    if op in FFN_OPS:
        n = s.local_experts
        fp8 = dtype == "fp8"
        w13, w2 = _ffn_weights(ctx, s, fp8)
        x = ctx.randn(n, t, d)  # (E, T, D)
        if op == "expert_ffn_loop" and fp8:
            one = torch.ones((), device=ctx.device, dtype=torch.float32)
            e4m3 = torch.float8_e4m3fn

            def ffn_fp8() -> Any:
                outs = []
                for e in range(n):
                    h = torch._scaled_mm(
                        x[e].to(e4m3), w13[e].t(), scale_a=one, scale_b=one, out_dtype=ctx.dtype
                    )  # (T, 2F)
                    g, u = h.chunk(2, dim=-1)
                    a = (F.silu(g) * u).to(e4m3)
                    outs.append(
                        torch._scaled_mm(
                            a, w2[e].t(), scale_a=one, scale_b=one, out_dtype=ctx.dtype
                        )
                    )
                return outs

            return ffn_fp8
        if op == "expert_ffn_loop":

            def ffn_loop() -> Any:
                outs = []
                for e in range(n):
                    g, u = (x[e] @ w13[e].t()).chunk(2, dim=-1)  # (T, F) each
                    outs.append((F.silu(g) * u) @ w2[e].t())  # (T, D)
                return outs

            return ffn_loop
        if op == "expert_ffn_bmm":

            def ffn_bmm() -> Any:
                g, u = torch.bmm(x, w13.transpose(1, 2)).chunk(2, dim=-1)  # (E, T, F)
                return torch.bmm(F.silu(g) * u, w2.transpose(1, 2))  # (E, T, D)

            return ffn_bmm
        x2 = x.reshape(n * t, d)  # (E*T, D), grouped by expert
        offs = torch.arange(1, n + 1, device=ctx.device, dtype=torch.int32) * t

        def ffn_grouped() -> Any:
            h = F.grouped_mm(x2, w13.transpose(1, 2), offs=offs)  # (E*T, 2F)
            g, u = h.chunk(2, dim=-1)
            return F.grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)  # (E*T, D)

        return ffn_grouped
    if op == "attention":
        return _build_attention(s, t, ctx)
    if op == "memcpy":
        src = ctx.randn(t, d)
        dst = torch.empty_like(src)

        def memcpy() -> Any:
            return dst.copy_(src)

        return memcpy
    raise ValueError(f"unknown op {op!r}")


def _build_attention(s: BenchShape, t: int, ctx: _Ctx) -> Callable[[], Any]:
    """Attention block over one sequence of ``t`` tokens (batch 1), causal.

    MLA runs its training/prefill form: low-rank q and kv projections, up-projection to
    per-head keys/values, and V zero-padded to the q/k head dim so that the fused
    (flash) SDPA kernels apply, as FlashAttention-2 based MLA prefill does.
    """
    torch = ctx.torch
    F = torch.nn.functional
    d, h, kvh, hd, vd = s.d_model, s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim
    w = ctx.weights.get("attention")
    if w is None:
        if s.kv_lora_rank:
            nope, rope = hd - s.qk_rope_head_dim, s.qk_rope_head_dim
            ql = s.q_lora_rank
            w = {
                "q_a": ctx.randn(ql, d, scale=d**-0.5) if ql else None,
                "q_b": ctx.randn(h * hd, ql or d, scale=(ql or d) ** -0.5),
                "kv_a": ctx.randn(s.kv_lora_rank + rope, d, scale=d**-0.5),
                "kv_b": ctx.randn(h * (nope + vd), s.kv_lora_rank, scale=s.kv_lora_rank**-0.5),
                "o": ctx.randn(d, h * vd, scale=(h * vd) ** -0.5),
            }
        else:
            w = {
                "qkv": ctx.randn((h + kvh) * hd + kvh * vd, d, scale=d**-0.5),
                "o": ctx.randn(d, h * vd, scale=(h * vd) ** -0.5),
            }
        ctx.weights["attention"] = w
    x = ctx.randn(t, d)  # (T, D)
    gqa = kvh != h

    if s.kv_lora_rank:
        nope, rope = hd - s.qk_rope_head_dim, s.qk_rope_head_dim

        def mla() -> Any:
            q_in = x @ w["q_a"].t() if w["q_a"] is not None else x  # (T, q_lora)
            q = (q_in @ w["q_b"].t()).view(t, h, hd).transpose(0, 1)  # (H, T, hd)
            kv_a = x @ w["kv_a"].t()  # (T, kv_lora + rope)
            c_kv, k_rope = kv_a.split([s.kv_lora_rank, rope], dim=-1)
            kv = (c_kv @ w["kv_b"].t()).view(t, h, nope + vd)
            k_nope, v = kv.split([nope, vd], dim=-1)  # (T, H, nope), (T, H, vd)
            k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(t, h, rope)], dim=-1)
            if vd < hd:
                v = F.pad(v, (0, hd - vd))
            o = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                is_causal=True,
            )  # (1, H, T, hd)
            o = o[..., :vd].squeeze(0).transpose(0, 1).reshape(t, h * vd)
            return o @ w["o"].t()  # (T, D)

        return mla

    def mha() -> Any:
        qkv = x @ w["qkv"].t()  # (T, (H + 2 KVH) hd)
        q, k, v = qkv.split([h * hd, kvh * hd, kvh * vd], dim=-1)
        q = q.view(t, h, hd).transpose(0, 1).unsqueeze(0)  # (1, H, T, hd)
        k = k.view(t, kvh, hd).transpose(0, 1).unsqueeze(0)
        v = v.view(t, kvh, vd).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1).reshape(t, h * vd) @ w["o"].t()  # (T, D)

    return mha


# ----- timing ---------------------------------------------------------------------------------
# glibc mallopt(3) parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextlib.contextmanager
def _kept_heap() -> Iterator[str | None]:
    """Keep freed memory in the process while measuring on CPU (glibc only).

    torch's CPU allocator calls ``malloc`` for every tensor and caches nothing. glibc
    serves a request above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with a
    fresh ``mmap`` and unmaps it on ``free`` (mallopt(3), ``M_MMAP_THRESHOLD``), so such a
    buffer faults in and zero-fills every page on every call: a step of 10-20x in time
    where an op's buffers pass the threshold, at a size that moves with the threshold.
    Setting ``M_MMAP_MAX`` to 0 (no mmapped chunks) and ``M_TRIM_THRESHOLD`` to its largest
    value (the heap is never given back) makes the heap keep freed blocks, so a call after
    warm-up reuses warm pages, as the CUDA caching allocator does on GPU. The glibc
    defaults are set back and the heap trimmed on exit. Yields a description for
    ``meta.json``, or ``None`` where the C library is not glibc (nothing is changed).
    """
    libc = None
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc is None:
        yield None
        return
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    try:
        yield "glibc heap kept (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1: never trimmed)" if ok else None
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)


def _prefault_heap(torch: Any, nbytes: float) -> str:
    """Grow the kept heap by ``nbytes`` of touched pages, then free them to it.

    With the heap kept, a call still faults in fresh pages whenever the heap has to grow,
    which happens at random points once the inputs' pads have fragmented it: DeepSeek-V3
    unpermute, fp32, 4,096 tokens, took 3.1 s instead of 0.17 s on a call that faulted in
    229,376 pages (about 14 µs each on this project's VM). Touched once here, those pages
    serve every later growth. Three times the memory cap covers a point's buffers and the
    fragmentation around them. Returns a note for ``meta.json``."""
    with contextlib.suppress(ValueError, OSError, AttributeError):  # at most half the free memory
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        nbytes = min(nbytes, free / 2)
    try:
        block = torch.empty(int(nbytes), dtype=torch.uint8)
        block.fill_(0)
    except RuntimeError:  # not that much memory after all: measure without
        return ", not pre-faulted"
    del block
    return f", {nbytes / 1e9:.1f} GB pre-faulted"


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _measure(fn: Callable[[], Any], cfg: BenchConfig, torch: Any) -> tuple[np.ndarray, float]:
    """Times of single calls in µs, after warm-up; returns (times, the fastest warm-up
    call in µs).

    One round's share of the point's budget: ``budget_s``, ``min_repeats`` and
    ``max_repeats`` divided by ``cfg.rounds``. Every round warms up in full: with its
    fresh inputs in a new place, the first two calls of a large op can both grow the heap
    and fault in its pages (DeepSeek-V3 unpermute, fp32, 2,048 tokens: 1.1 and 1.6 s, then
    0.08-0.1 s)."""
    cuda = cfg.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rounds = max(1, cfg.rounds)
    warmup = max(1, cfg.warmup)
    with _no_gc():
        warm = []
        for _ in range(warmup):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            warm.append(time.perf_counter() - t0)
        per_call_s = sum(warm) / warmup
        want = cfg.budget_s / rounds / max(per_call_s, 1e-9)
        lo = math.ceil(cfg.min_repeats / rounds)
        hi = max(lo, math.ceil(cfg.max_repeats / rounds))
        repeats = int(min(hi, max(lo, math.ceil(want))))
        times = np.empty(repeats, dtype=np.float64)
        if cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for i in range(repeats):
                starts[i].record()
                fn()
                ends[i].record()
            sync()
            for i in range(repeats):
                times[i] = starts[i].elapsed_time(ends[i]) * 1e3  # ms -> µs
        else:
            clock = time.perf_counter
            for i in range(repeats):
                t = clock()
                fn()
                times[i] = (clock() - t) * 1e6
    return times, min(warm) * 1e6


def _torch_dtype(torch: Any, dtype: str) -> Any:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[dtype]


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every (shape, op, dtype, tokens) point of ``cfg``; nothing is written.

    Raises :class:`~moesim.errors.InputError` if ``cfg.device`` is ``cuda`` and no CUDA
    device is available, or for an unknown op or dtype.
    """
    import torch

    for op in cfg.ops:
        if op not in OPS:
            raise InputError(f"unknown op; valid: {', '.join(OPS)}", field="ops", value=op)
    for dt in cfg.dtypes:
        if dt not in DTYPES:
            raise InputError(f"unknown dtype; valid: {', '.join(DTYPES)}", field="dtypes", value=dt)
    if cfg.device == "cuda":
        _require_cuda()
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    name = device_name(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise InputError("threads must be >= 1", field="threads", value=cfg.threads)
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    flush_denormal = torch.set_flush_denormal(True) if cfg.device == "cpu" else False
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    heap: contextlib.AbstractContextManager[str | None] = (
        _kept_heap() if cfg.device == "cpu" else contextlib.nullcontext(None)
    )
    try:
        with heap as allocator:
            if allocator is not None:
                allocator += _prefault_heap(torch, 3 * cfg.max_bytes)
            # every round sweeps every series once, so that each point is measured at
            # cfg.rounds times spread over the run, each time with fresh inputs: the state
            # a call meets (buffer placement, clocks, other load) varies over minutes, and
            # one sitting would carry its luck into the table
            # (a layout bias that one fixed allocation order would keep in every round:
            # Mytkowicz et al., "Producing wrong data without doing anything obviously
            # wrong!", ASPLOS 2009), so each round places the inputs differently (_Ctx)
            series: dict[tuple[int, str, str], dict[int, list[np.ndarray]]] = {}
            for r in range(max(1, cfg.rounds)):
                for i, shape in enumerate(cfg.shapes):
                    for op in cfg.ops:
                        for dt in cfg.dtypes:
                            reason = supported(op, dt, cfg.device)
                            if reason:
                                if r == 0:
                                    skipped.append(
                                        {"model": shape.model, "op": op, "dtype": dt}
                                        | {"reason": reason}
                                    )
                                continue
                            got = series.setdefault((i, op, dt), {})
                            _run_series(cfg, shape, op, dt, torch, got, skipped, say, r)
            for (i, op, dt), got in series.items():
                rows += _series_rows(cfg, cfg.shapes[i], op, dt, got, torch, name, threads)
    finally:
        if cfg.device == "cpu":
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)
    wall_s = time.perf_counter() - t_start
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    meta = _meta(cfg, name, threads, bool(flush_denormal), wall_s, len(table), skipped, torch)
    meta["cpu_allocator"] = allocator
    return BenchResult(rows=table, skipped=skipped, meta=meta, wall_s=wall_s)


def _run_series(
    cfg: BenchConfig,
    shape: BenchShape,
    op: str,
    dt: str,
    torch: Any,
    got: dict[int, list[np.ndarray]],
    skipped: list[dict[str, Any]],
    say: Callable[[str], None],
    round_index: int,
) -> None:
    """One round of a (shape, op, dtype) series, smallest token count first: adds each
    point's times to ``got`` (tokens → one array per round). The first round decides which
    points run (the caps cut a series there); later rounds measure those again."""
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed)
    r = round_index
    layout = np.random.default_rng([cfg.seed, r]) if cfg.rounds > 1 else None
    ctx = _Ctx(
        torch=torch, device=cfg.device, dtype=_torch_dtype(torch, dt), gen=gen, layout=layout
    )
    first = round_index == 0
    tokens_list = sorted(set(cfg.tokens)) if first else sorted(got)
    rounds = max(1, cfg.rounds)
    for i, tokens in enumerate(tokens_list):
        alloc = op_work(op, shape, tokens, dt)[2]
        base = {"model": shape.model, "op": op, "dtype": dt, "tokens": tokens}
        if first and alloc > cfg.max_bytes:
            why = f"estimated memory {alloc / 1e9:.2f} GB > cap {cfg.max_bytes / 1e9:.2f} GB"
            skipped.append(base | {"reason": why, "tokens_skipped": tokens_list[i:]})
            break
        try:
            # the point's inputs live only inside this call, so they are freed on return
            times, fastest_warm = _measure(_build(op, shape, tokens, dt, ctx), cfg, torch)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            # an unsupported kernel/dtype combination or out of memory on this build; a
            # TypeError only counts from the private fp8 API (torch._scaled_mm)
            if isinstance(err, TypeError) and dt != "fp8":
                raise
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
            msg = " ".join(str(err).split())[:300]
            # (in a later round the point ran before: its table row keeps the rounds that
            # measured it, and says how many in ``rounds``)
            skipped.append(
                base | {"reason": f"{type(err).__name__}: {msg}"} | ({} if first else {"round": r})
            )
            say(f"{shape.model} {op} {dt} tokens={tokens}: failed, {type(err).__name__}")
            if isinstance(err, torch.cuda.OutOfMemoryError):
                break
            continue
        got.setdefault(tokens, []).append(times)
        med = float(np.median(times))
        say(
            f"{shape.model} {op} {dt} tokens={tokens}: median {med:,.1f} µs "
            f"({len(times)} runs, round {round_index + 1}/{rounds})"
        )
        # the fastest call, warm-up included, decides (a point of a slow series times one
        # call per round, and a stall of the machine then must not cut the series)
        fastest = min(float(times.min()), fastest_warm)
        if first and fastest > cfg.max_call_us:
            rest = tokens_list[i + 1 :]
            if rest:
                cap = cfg.max_call_us / 1e3
                skipped.append(
                    base
                    | {"reason": f"fastest call {fastest / 1e3:.0f} ms > cap {cap:.0f} ms"}
                    | {"tokens_skipped": rest}
                )
            break
    ctx.weights.clear()
    ctx.pads.clear()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()


def _series_rows(
    cfg: BenchConfig,
    shape: BenchShape,
    op: str,
    dt: str,
    got: dict[int, list[np.ndarray]],
    torch: Any,
    name: str,
    threads: int,
) -> list[dict[str, Any]]:
    """Table rows of one series: per point, ``median_us`` is the median of its rounds'
    medians (what one sitting's luck cannot move), the other figures pool every call."""
    rows = []
    for tokens in sorted(got):
        flops, moved, _ = op_work(op, shape, tokens, dt)
        pooled = np.concatenate(got[tokens])
        p10, p90 = np.percentile(pooled, [10, 90])
        mid = float(np.clip(np.median([np.median(t) for t in got[tokens]]), p10, p90))
        rows.append(
            {
                "op": op,
                "model": shape.model,
                "dtype": dt,
                "tokens": tokens,
                **table_widths(op, shape),
                "flops": flops,
                "bytes": moved,
                "median_us": mid,
                "p10_us": float(p10),
                "p90_us": float(p90),
                "min_us": float(pooled.min()),
                "repeats": len(pooled),
                "rounds": len(got[tokens]),
                "warmup": max(1, cfg.warmup),
                "threads": threads,
                "torch_version": torch.__version__,
                "device": name,
            }
        )
    return rows


def _meta(
    cfg: BenchConfig,
    name: str,
    threads: int,
    flush_denormal: bool,
    wall_s: float,
    rows: int,
    skipped: list[dict[str, Any]],
    torch: Any,
) -> dict[str, Any]:
    from moesim import __version__

    meta: dict[str, Any] = {
        "device": name,
        "device_slug": device_slug(name),
        "device_kind": cfg.device,
        "torch_version": torch.__version__,
        "moesim_version": __version__,
        "threads": threads,
        "timer": "cuda events" if cfg.device == "cuda" else "time.perf_counter",
        "flush_denormal": flush_denormal,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 3),
        "rows": rows,
        "config": {
            "quick": cfg.quick,
            "ops": list(cfg.ops),
            "dtypes": list(cfg.dtypes),
            "tokens": list(cfg.tokens),
            "warmup": cfg.warmup,
            "rounds": cfg.rounds,
            "min_repeats": cfg.min_repeats,
            "max_repeats": cfg.max_repeats,
            "budget_s": cfg.budget_s,
            "max_call_us": cfg.max_call_us,
            "max_bytes": cfg.max_bytes,
            "seed": cfg.seed,
            "shapes": [asdict(s) for s in cfg.shapes],
        },
        "skipped": skipped,
    }
    if cfg.device == "cuda":
        meta["cuda_version"] = str(torch.version.cuda)
        meta["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return meta


def measured_dir(device: Device = "cpu", out: str | Path | None = None) -> Path:
    """This machine's table folder for ``device``: ``<out>/<device-slug>`` (default
    ``out``: the repository's ``kernels/measured``)."""
    if out is None:
        from moesim.paths import repo_root

        out = repo_root() / "kernels" / "measured"
    return Path(out) / device_slug(device_name(device))


def check_existing(out: str | Path, device: Device) -> Path:
    """The device folder under ``out``; validates tables already there (before a long run)."""
    folder = measured_dir(device, out)
    if folder.is_dir() and any(folder.glob("*.csv")):
        load_table(folder)
    return folder


def write_results(result: BenchResult, out: str | Path) -> list[Path]:
    """Merge the rows into ``<out>/<device-slug>/<op>.csv`` and write ``meta.json``, atomically."""
    folder = Path(out) / result.meta["device_slug"]
    files: list[Path] = []
    for op in OPS:
        part = result.rows[result.rows["op"] == op]
        if len(part):
            files.append(write_op_table(folder, op, part))
    files.append(write_meta(folder, result.meta))
    result.files = files
    return files
