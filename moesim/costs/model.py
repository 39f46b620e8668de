"""The cost model: op times from measured kernel tables, else a calibrated roofline.

``CostModel.time_us(op, shape, tokens, dtype)``:

1. If the device's measured table has this exact shape (op, dtype and widths), the time
   is interpolated in tokens with a monotone cubic (PCHIP) in log-log space, so the
   small-batch inefficiency the table measured is kept; outside the measured range (or
   with a single measured point) the calibrated roofline takes over, scaled to meet the
   table at its edge.
2. Otherwise the time is a roofline with per-op factors::

       t = launch_us + smoothmax(flops * (tokens + half) / (tokens * peak),
                                 bytes / bandwidth(bytes))
       bandwidth(b) = dram + (cache - dram) / (1 + (b / cache_bytes) ** sharpness)
       half = half_tokens * (dram / bandwidth(bytes)) ** half_cache

   ``peak`` (FLOP/µs) and the bandwidths (bytes/µs) are achievable rates; ``half_tokens``
   is the batch at which a GEMM reaches half its peak (the small-batch inefficiency);
   the bandwidth steps from cache speed down to memory speed around a working set of
   ``cache_bytes`` — the same caches serve every shape, so this carries across shapes
   (a second, nearer level is fitted the same way where it helps); ``half_cache`` (0 or 1,
   chosen per op by :func:`_choose_half_cache`) says whether that small-batch cost is
   weight traffic, which a cache speeds up as well.
   Without a table the factors come from the hardware profile (peak × gemm efficiency,
   HBM × hbm efficiency, its launch overhead, no small-batch or cache term); with a
   table, :func:`fit_memory_curve` first fits the device's memory curve (memory and
   cache bandwidth, cache size and sharpness) to its ``memcpy`` rows, then
   :func:`calibrate` fits per op, by least squares on log time, a launch overhead, a
   compute peak, ``half_tokens`` and a traffic factor on that curve (every factor free
   where the table has no ``memcpy`` rows; the launch weakly pulled towards the curve's,
   :data:`LAUNCH_PRIOR`; the router also a GEMM tile width, :func:`gemm_width`), and
   :func:`fit_token_correction` then fits, per measured token count ``T``, a log-linear
   correction ``log t = a(T) + b(T) log roofline`` across the table's shapes
   (:class:`TokenCorrection`): the part of the small-batch behaviour that depends on
   the number of rows a kernel gets (a matrix-vector kernel at one token, other
   blockings at a few) rather than on work, which the smooth form above cannot follow.

``flops`` and ``bytes`` of an op come from :func:`moesim.costs.work.op_work`, the same
work model the benchmark records, so tables and model agree on what an op does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.interpolate import PchipInterpolator
from scipy.optimize import least_squares

from moesim.costs.work import BenchShape, op_output_width, op_work_array, table_widths
from moesim.hardware import HardwareProfile
from moesim.kernels.tables import thread_count

__all__ = [
    "CostModel",
    "OpFactors",
    "TokenCorrection",
    "bandwidth",
    "calibrate",
    "cost_model_for",
    "fit_memory_curve",
    "fit_token_correction",
    "gemm_width",
    "load_cost_model",
    "op_elements",
    "predict_us",
    "profile_factors",
]

_SMOOTH_P = 4.0  # smooth maximum of compute and memory time
_SHAPE_COLS = ("d_model", "d_ff", "num_experts", "top_k", "num_heads", "head_dim")


@dataclass(frozen=True)
class OpFactors:
    """Roofline factors of one op (see the module docstring); rates per µs."""

    launch_us: float
    peak_flop_per_us: float
    bytes_per_us: float  # memory (DRAM/HBM) bandwidth
    half_tokens: float = 0.0
    cache_bytes_per_us: float | None = None  # None: no cache step
    cache_bytes: float = 1.0
    cache_sharpness: float = 1.0
    # a nearer, faster cache level inside that one (a CPU's L2 inside its L3); None: none
    near_bytes_per_us: float | None = None
    near_bytes: float = 1.0
    near_sharpness: float = 1.0
    tile_width: float = 1.0  # GEMM width below which a call costs no less (see gemm_width)
    element_us: float = 0.0  # per scalar element of an op's epilogue (see op_elements)
    half_cache: float = 0.0  # 1: half_tokens is weight traffic, sped up by the caches

    def to_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


def gemm_width(op: str, num_experts: np.ndarray | float) -> np.ndarray:
    """The narrow output width of an op's GEMM, where it has one narrow enough to matter:
    the router's ``(T, d_model) @ (d_model, E)`` has E columns (8 for Mixtral), and a GEMM
    library computes a whole micro-kernel tile of columns whatever E is, so a router with
    few experts runs at a fraction of the rate of one with many (on this project's CPU,
    bf16 at 4,096 tokens: 29-41 GFLOP/s with 8 experts, 113-184 with 64-256). Other ops:
    infinite (their GEMMs are d_model or d_ff wide)."""
    if op == "router":
        return np.asarray(num_experts, dtype=np.float64)
    return np.full(np.shape(num_experts), np.inf)


def op_elements(
    op: str, tokens: np.ndarray | float, num_experts: np.ndarray | float, top_k: np.ndarray | float
) -> np.ndarray:
    """Scalar elements of an op's epilogue, work that runs at vector (not GEMM) speed and
    apart from its GEMM: the router's score of every (token, expert) pair through softmax
    or sigmoid and the top-k selection over them, T x E; permute's sort and bookkeeping of
    the T x k expert ids. Other ops: 0. On this project's CPU the router's epilogue is most
    of a small model's router time (FLAME-MoE-290M, bf16: about 0.6 of 0.8 µs per token),
    so its time per token grows with the experts, not with d_model."""
    t = np.asarray(tokens, dtype=np.float64)
    if op == "router":
        return t * np.asarray(num_experts, dtype=np.float64)
    if op == "permute":
        return t * np.asarray(top_k, dtype=np.float64)
    return np.zeros(np.broadcast(t, np.asarray(num_experts)).shape)


def predict_us(
    f: OpFactors,
    flops: np.ndarray,
    nbytes: np.ndarray,
    tokens: np.ndarray,
    width: np.ndarray | float = np.inf,
    elements: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Roofline time of calls with the given work and tokens (arrays broadcast); ``width``:
    the GEMM's narrow width (:func:`gemm_width`), below ``f.tile_width`` the arithmetic is
    that of ``tile_width`` columns; ``elements`` (:func:`op_elements`) add ``element_us``
    each, after the roofline part (a kernel of their own)."""
    tokens = np.maximum(np.asarray(tokens, dtype=np.float64), 1e-9)
    nbytes = np.asarray(nbytes, float)
    pad = np.maximum(1.0, f.tile_width / np.maximum(np.asarray(width, dtype=np.float64), 1.0))
    # the tile pads the GEMM's arithmetic, not its per-call cost (the small-batch term,
    # weight packing and streaming, scales with the real width)
    bw = bandwidth(f, nbytes)
    # the small-batch term: a fixed cost per call in units of tokens of arithmetic, which
    # where it is weight traffic (half_cache 1) speeds up as the weights fit a cache
    half = f.half_tokens * (f.bytes_per_us / bw) ** f.half_cache
    compute = np.asarray(flops, float) * (pad * tokens + half) / (tokens * f.peak_flop_per_us)
    memory = nbytes / bw
    p = _SMOOTH_P
    epilogue = f.element_us * np.asarray(elements, dtype=np.float64)
    return f.launch_us + (compute**p + memory**p) ** (1 / p) + epilogue


def bandwidth(f: OpFactors, nbytes: np.ndarray | float) -> np.ndarray | float:
    """Memory bandwidth (bytes/µs) of a call moving ``nbytes``: memory speed, stepping up
    to the cache's below ``cache_bytes`` and to the near cache's below ``near_bytes``."""
    bw: np.ndarray | float = f.bytes_per_us
    b = np.maximum(nbytes, 1.0)
    if f.cache_bytes_per_us is not None:
        step = 1 + (b / f.cache_bytes) ** f.cache_sharpness
        bw = bw + (f.cache_bytes_per_us - f.bytes_per_us) / step
        if f.near_bytes_per_us is not None:
            near = 1 + (b / f.near_bytes) ** f.near_sharpness
            bw = bw + (f.near_bytes_per_us - f.cache_bytes_per_us) / near
    return bw


def profile_factors(hw: HardwareProfile, dtype: str, width: float | None = None) -> OpFactors:
    """Factors from a hardware profile's peaks and efficiency factors (no table): the
    dtype's peak x its GEMM efficiency, HBM x hbm efficiency, and for GEMMs of ``width``
    output elements per row the small-batch term: the profile's half outputs over the
    width, in rows (:meth:`~moesim.hardware.Efficiency.gemm_factors`; None: no term)."""
    eff, half = hw.efficiency.gemm_factors(hw.runs_fp8(dtype))
    return OpFactors(
        launch_us=hw.kernel_launch_us,
        peak_flop_per_us=hw.peak_tflops(dtype) * eff * 1e6,
        bytes_per_us=hw.memory.hbm_bandwidth_gbps * hw.efficiency.hbm * 1e3,
        half_tokens=half / width if width else 0.0,
    )


def calibrate(
    rows: pd.DataFrame,
    start: OpFactors | None = None,
    memory: OpFactors | None = None,
    width: np.ndarray | None = None,
    *,
    cache_levels: int = 1,
    elements: np.ndarray | None = None,
    half_cache: float = 0.0,
) -> OpFactors:
    """Fit one op's factors to measured rows (columns flops, bytes, tokens, median_us).

    Least squares on log(predicted / measured), so every size counts alike. Without
    ``memory`` every factor is free, with ``cache_levels`` (1 or 2) cache steps. With
    ``memory`` (the device's memory curve, see :func:`fit_memory_curve`) the cache steps
    are the device's (their sizes and sharpness, and the ratios of their bandwidths to
    memory's), and the op fits only a launch overhead, its compute peak, ``half_tokens``
    and one traffic factor dividing every bandwidth: how many times its kernels move the
    bytes :func:`~moesim.costs.work.op_work` counts (a GEMM library packing a weight
    matrix reads and writes it again). Memory speed is a property of the device, not of
    an op, so a shape beyond an op's measured working sets is predicted at the device's
    memory speed, not at a bandwidth fitted to few points.

    ``width`` (one per row, :func:`gemm_width`): where the rows have two or more finite
    widths, ``tile_width`` is fitted too. ``elements`` (one per row, :func:`op_elements`):
    where any is positive, ``element_us`` is fitted too. ``half_cache`` is taken as given
    (see :data:`HALF_CACHE_CHOICES`).
    """
    fl = rows["flops"].to_numpy(float)
    by = rows["bytes"].to_numpy(float)
    tok = rows["tokens"].to_numpy(float)
    t = rows["median_us"].to_numpy(float)
    w = np.full(t.size, np.inf) if width is None else np.asarray(width, dtype=np.float64)
    fit_tile = np.unique(w[np.isfinite(w)]).size >= 2
    el = np.zeros(t.size) if elements is None else np.asarray(elements, dtype=np.float64)
    big = t > np.median(t)
    peak = float(np.max(fl[big] / t[big])) if (fl[big] > 0).any() else 1.0
    # the fitted factors, by name: (start, low, high), all in log space
    p: dict[str, tuple[float, float, float]] = {
        "launch": (max(t.min() * 0.5, 0.05), 1e-3, 1e6),
        "peak": (max(peak, 1.0), 1e-3, 1e12),
        "half_tokens": (8.0, 1e-3, 1e6),
    }
    if memory is not None:
        p["traffic"] = (1.0, *TRAFFIC_BOUNDS)
    else:
        bw = float(np.median(by / t))
        p["memory"] = (max(bw, 1.0), 1e-3, 1e12)
        # cache / memory bandwidth (>= 1: a cache is never slower than memory), its size
        # and sharpness; a near cache: its bandwidth / the cache's, size / the cache's
        p["cache_ratio"] = (4.0, 1.0, 1e4)
        p["cache_bytes"] = (4e6, 1e3, 1e11)
        p["cache_sharpness"] = (2.0, 0.3, 8.0)
        if cache_levels == 2:
            p["near_ratio"] = (3.0, 1.0, 1e3)
            p["near_share"] = (0.05, 1e-5, 1.0)
            p["near_sharpness"] = (2.0, 0.3, 8.0)
        if start is not None:  # start from its figures where it has them
            given = {
                "launch": start.launch_us,
                "peak": start.peak_flop_per_us,
                "memory": start.bytes_per_us,
            }
            if start.cache_bytes_per_us is not None:
                given |= {
                    "cache_ratio": start.cache_bytes_per_us / start.bytes_per_us,
                    "cache_bytes": start.cache_bytes,
                    "cache_sharpness": start.cache_sharpness,
                }
            if start.near_bytes_per_us is not None and start.cache_bytes_per_us is not None:
                given |= {
                    "near_ratio": start.near_bytes_per_us / start.cache_bytes_per_us,
                    "near_share": start.near_bytes / start.cache_bytes,
                    "near_sharpness": start.near_sharpness,
                }
            for name, value in given.items():
                if name in p:
                    p[name] = (value, *p[name][1:])
    if fit_tile:  # the tile width, 1 to 1,024 columns
        p["tile"] = (16.0, 1.0, 1024.0)
    if (el > 0).any():  # µs per epilogue element
        p["element"] = (1e-3, 1e-7, 10.0)
    names = list(p)
    lo = np.log([p[n][1] for n in names])
    hi = np.log([p[n][2] for n in names])
    x0 = np.clip(np.log([p[n][0] for n in names]), lo + 1e-9, hi - 1e-9)

    def unpack(x: np.ndarray) -> OpFactors:
        v = dict(zip(names, np.exp(x).tolist(), strict=True))
        common = {
            "launch_us": v["launch"],
            "peak_flop_per_us": v["peak"],
            "half_tokens": v["half_tokens"],
            "tile_width": v.get("tile", 1.0),
            "element_us": v.get("element", 0.0),
            "half_cache": half_cache,
        }
        if memory is not None:
            tr, mem = v["traffic"], memory
            return OpFactors(
                **common,
                bytes_per_us=mem.bytes_per_us / tr,
                cache_bytes_per_us=(mem.cache_bytes_per_us or mem.bytes_per_us) / tr,
                cache_bytes=mem.cache_bytes,
                cache_sharpness=mem.cache_sharpness,
                near_bytes_per_us=(
                    None if mem.near_bytes_per_us is None else mem.near_bytes_per_us / tr
                ),
                near_bytes=mem.near_bytes,
                near_sharpness=mem.near_sharpness,
            )
        cache_bw = v["cache_ratio"] * v["memory"]
        near = {}
        if cache_levels == 2:
            near = {
                "near_bytes_per_us": v["near_ratio"] * cache_bw,
                "near_bytes": v["near_share"] * v["cache_bytes"],
                "near_sharpness": v["near_sharpness"],
            }
        return OpFactors(
            **common,
            bytes_per_us=v["memory"],
            cache_bytes_per_us=cache_bw,
            cache_bytes=v["cache_bytes"],
            cache_sharpness=v["cache_sharpness"],
            **near,
        )

    # a weak pull of the launch overhead towards the device's own (the memory curve's):
    # where no measured shape is small enough to show it, it is otherwise free to absorb
    # part of the memory time, and a smaller shape is then predicted far too slow
    prior = math.log(max(memory.launch_us, 1e-3)) if memory is not None else None
    pull = LAUNCH_PRIOR * math.sqrt(t.size)

    def resid(x: np.ndarray) -> np.ndarray:
        r = np.log(predict_us(unpack(x), fl, by, tok, w, el)) - np.log(t)
        return r if prior is None else np.append(r, pull * (x[0] - prior))

    fit = unpack(least_squares(resid, x0, bounds=(lo, hi)).x)
    if fit_tile and fit.tile_width <= np.min(w[np.isfinite(w)]):
        # no row narrower than the tile: nothing measured it, so assume none
        fit = replace(fit, tile_width=1.0)
    return fit


LAUNCH_PRIOR = 0.03
"""Weight of that pull, per unit of log launch, relative to one row's log error."""


TRAFFIC_BOUNDS = (0.25, 64.0)
"""Range of an op's traffic factor (bytes its kernels move / bytes ``op_work`` counts)."""


MEMORY_OP = "memcpy"
"""The op whose rows calibrate a device's memory curve (it moves bytes and nothing else)."""


def fit_memory_curve(table: pd.DataFrame) -> OpFactors | None:
    """The device's memory curve: :func:`calibrate` on every ``memcpy`` row (all dtypes:
    a byte is a byte), of which the bandwidths and the cache steps are kept. ``None`` when
    the table has fewer than four ``memcpy`` rows.

    Two cache levels are fitted (a CPU's L2 and L3, a GPU's L2 and, where measured, its
    shared memory), from a few starting sizes of the outer one, and the best fit kept;
    where a second level does not improve the fit, its step is negligible there.
    """
    rows = table[table["op"] == MEMORY_OP]
    if len(rows) < 4:
        return None
    one = calibrate(rows)
    best, best_cost = one, _log_cost(one, rows)
    for outer in (3e6, 3e7, 3e8):
        start = replace(
            one,
            cache_bytes=outer,
            near_bytes_per_us=(one.cache_bytes_per_us or one.bytes_per_us) * 3.0,
            near_bytes=outer * 0.05,
            near_sharpness=2.0,
        )
        two = calibrate(rows, start, cache_levels=2)
        cost = _log_cost(two, rows)
        if cost < best_cost:
            best, best_cost = two, cost
    return best


def _log_cost(
    f: OpFactors,
    rows: pd.DataFrame,
    width: np.ndarray | float = np.inf,
    elements: np.ndarray | float = 0.0,
    correction: TokenCorrection | None = None,
) -> float:
    """Sum of squared log errors of ``f`` (and its token ``correction``, if given) on
    measured rows; ``width`` and ``elements`` as :func:`predict_us` takes them."""
    tok = rows["tokens"].to_numpy(float)
    fl, by = rows["flops"].to_numpy(float), rows["bytes"].to_numpy(float)
    pred = predict_us(f, fl, by, tok, width, elements)
    if correction is not None:
        pred = correction.apply(tok, pred)
    return float((np.log(pred / rows["median_us"].to_numpy(float)) ** 2).sum())


@dataclass(frozen=True)
class TokenCorrection:
    """A per-token-count correction of one op's calibrated roofline.

    At each measured token count ``T``: ``log t = offset(T) + slope(T) * log roofline(T)``,
    fitted across the table's shapes; between token counts both are interpolated in
    ``log T``, beyond them held at the nearest one. It carries what the roofline's smooth
    form cannot and what every shape shares at the same ``T``: the kernel a library
    picks for a given number of rows (a matrix-vector product at one token, other
    blockings and packing at a few), which is the small-batch behaviour the
    micro-benchmarks measure. ``slope`` is pulled towards 1 (see
    :func:`fit_token_correction`), so one shape alone gives a pure per-``T`` offset.
    """

    log_tokens: tuple[float, ...]
    offset: tuple[float, ...]
    slope: tuple[float, ...]

    def apply(self, tokens: np.ndarray, roofline_us: np.ndarray) -> np.ndarray:
        """Corrected times; ``tokens`` and ``roofline_us`` have the same shape."""
        lt = np.log(np.maximum(np.asarray(tokens, dtype=np.float64), 1.0))
        a = np.interp(lt, self.log_tokens, self.offset)
        b = np.interp(lt, self.log_tokens, self.slope)
        return np.asarray(np.exp(a + b * np.log(np.asarray(roofline_us, float))))

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.__dict__.items()}


SLOPE_RIDGE = 10.0
"""Weight pulling a token count's slope towards 1 (in units of summed squared log µs)."""


def fit_token_correction(
    rows: pd.DataFrame,
    f: OpFactors,
    ridge: float = SLOPE_RIDGE,
    width: np.ndarray | float = np.inf,
    elements: np.ndarray | float = 0.0,
) -> TokenCorrection:
    """Fit :class:`TokenCorrection` of factors ``f`` to one op's measured rows.

    Per token count ``T`` with rows ``i``: minimise
    ``sum_i (log t_i - a - b log r_i)**2 + ridge * (b - 1)**2`` (``r``: the roofline), a
    2x2 linear solve. ``rows``: columns flops, bytes, tokens, median_us.
    """
    tok = rows["tokens"].to_numpy(float)
    fl, by = rows["flops"].to_numpy(float), rows["bytes"].to_numpy(float)
    x = np.log(predict_us(f, fl, by, tok, width, elements))
    y = np.log(rows["median_us"].to_numpy(float))
    levels = np.unique(tok)
    offset = np.empty(levels.size)
    slope = np.empty(levels.size)
    for i, level in enumerate(levels):
        xs, ys = x[tok == level], y[tok == level]
        lhs = np.array([[xs.size, xs.sum()], [xs.sum(), (xs * xs).sum() + ridge]])
        rhs = np.array([ys.sum(), (xs * ys).sum() + ridge])
        offset[i], slope[i] = np.linalg.solve(lhs, rhs)
    return TokenCorrection(
        tuple(np.log(np.maximum(levels, 1.0)).tolist()),
        tuple(offset.tolist()),
        tuple(slope.tolist()),
    )


def _row_terms(op: str, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``op``: its GEMM width (:func:`gemm_width`) and epilogue elements
    (:func:`op_elements`)."""
    experts = rows["num_experts"].to_numpy(float)
    return gemm_width(op, experts), op_elements(
        op, rows["tokens"].to_numpy(float), experts, rows["top_k"].to_numpy(float)
    )


def _fit_op(
    rows: pd.DataFrame, start: OpFactors | None, memory: OpFactors | None, half_cache: float
) -> tuple[OpFactors, TokenCorrection]:
    """One op's factors (:func:`calibrate`) and token correction from its rows."""
    width, el = _row_terms(str(rows["op"].iloc[0]), rows)
    f = calibrate(rows, start, memory, width, elements=el, half_cache=half_cache)
    return f, fit_token_correction(rows, f, width=width, elements=el)


HALF_CACHE_CHOICES = (0.0, 1.0)
"""What the small-batch term of an op can be (``OpFactors.half_cache``): 0, a fixed cost
in arithmetic (a library's blocking and loop overheads), or 1, weight traffic that runs at
the memory curve's speed for the call's working set (streaming or packing a weight matrix:
the fp32 expert FFN of this project's CPU at 1-16 tokens runs at 26 GB/s where its 35 MB
of weights fit the L3 and 16 GB/s where they do not)."""


def _choose_half_cache(
    rows: pd.DataFrame, start: OpFactors | None, memory: OpFactors | None
) -> float:
    """The :data:`HALF_CACHE_CHOICES` entry under which one op's measured shapes predict
    each other best: each model shape in turn is left out, the op fitted on the others
    (factors and token correction) and the left-out rows predicted; the sum of squared
    log errors over all of them decides. The first choice where nothing can decide it: no
    memory curve with a cache step, no arithmetic, or fewer than three shapes."""
    op = str(rows["op"].iloc[0])
    models = list(rows["model"].unique()) if "model" in rows.columns else []
    if (
        memory is None
        or memory.cache_bytes_per_us is None
        or not (rows["flops"] > 0).any()
        or len(models) < 3
    ):
        return HALF_CACHE_CHOICES[0]
    best, best_err = HALF_CACHE_CHOICES[0], math.inf
    for choice in HALF_CACHE_CHOICES:
        err = 0.0
        for model in models:
            train, test = rows[rows["model"] != model], rows[rows["model"] == model]
            f, corr = _fit_op(train, start, memory, choice)
            err += _log_cost(f, test, *_row_terms(op, test), correction=corr)
        if err < best_err:
            best, best_err = choice, err
    return best


@dataclass
class CostModel:
    """Op times for one device: a hardware profile, plus its measured table if it has one."""

    hw: HardwareProfile | None = None
    table: pd.DataFrame | None = None
    factors: dict[tuple[str, str], OpFactors] = field(default_factory=dict)
    corrections: dict[tuple[str, str], TokenCorrection] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pd.DataFrame, hw: HardwareProfile | None = None) -> CostModel:
        """Calibrate every (op, dtype) of ``table``.

        Raises :class:`~moesim.errors.InputError` if the table mixes thread counts (one
        device folder must describe one configuration: merge runs with the same
        ``--threads``).
        """
        thread_count(table)
        factors = {}
        corrections = {}
        memory = fit_memory_curve(table)
        for (op, dtype), rows in table.groupby(["op", "dtype"], sort=True):
            start = profile_factors(hw, str(dtype)) if hw is not None else None
            key = (str(op), str(dtype))
            half = _choose_half_cache(rows, start, memory)
            factors[key], corrections[key] = _fit_op(rows, start, memory, half)
        return cls(hw=hw, table=table, factors=factors, corrections=corrections)

    def op_factors(self, op: str, dtype: str, shape: BenchShape | None = None) -> OpFactors:
        """The op's calibrated factors, else the profile's (with the small-batch term of
        the op's GEMM width in ``shape``, :func:`~moesim.costs.work.op_output_width`)."""
        if (op, dtype) in self.factors:
            return self.factors[(op, dtype)]
        if self.hw is None:
            raise KeyError(f"no measurements of {op} in {dtype} and no hardware profile")
        width = op_output_width(op, shape) if shape is not None else None
        return profile_factors(self.hw, dtype, width)

    def roofline_us(self, op: str, shape: BenchShape, tokens: np.ndarray, dtype: str) -> np.ndarray:
        """Calibrated roofline time (with the op's token correction where fitted), no table."""
        tokens = np.atleast_1d(np.asarray(tokens, dtype=np.float64))
        flops, moved = op_work_array(op, shape, np.maximum(np.floor(tokens), 1.0), dtype)
        scale = np.where(tokens >= 1, 1.0, tokens)  # fractional tokens: scale the 1-token work
        t = predict_us(
            self.op_factors(op, dtype, shape),
            flops * scale,
            moved * scale,
            np.maximum(tokens, 1),
            gemm_width(op, float(shape.num_experts)),
            op_elements(op, tokens, float(shape.num_experts), float(shape.top_k)),
        )
        corr = self.corrections.get((op, dtype))
        return t if corr is None else corr.apply(np.maximum(tokens, 1), t)

    def _measured(self, op: str, shape: BenchShape, dtype: str) -> pd.DataFrame | None:
        """Measured ``tokens`` and ``median_us`` of ``op`` in ``dtype`` with exactly this
        shape's widths, one row per token count (sorted), or ``None``."""
        if self.table is None:
            return None
        t = self.table
        m = (t["op"] == op) & (t["dtype"] == dtype)
        for col, value in table_widths(op, shape).items():
            if col in t.columns:
                m &= t[col] == value
        rows = t[m]
        if not len(rows):
            return None
        # two model shapes may share an op's widths (the same call measured twice): one
        # point per token count, the median of its measurements
        return rows.groupby("tokens", sort=True)["median_us"].median().reset_index()

    def grouped_ffn_us(
        self,
        tokens_per_slot: np.ndarray,
        shape: BenchShape,
        dtype: str,
        op: str = "expert_ffn_grouped",
    ) -> np.ndarray:
        """Grouped-GEMM expert FFN time of each device from its slots' token counts.

        ``tokens_per_slot``: (D, S). One call runs all of a device's experts: its time is
        one launch plus, per expert with tokens, the per-expert share of a call measured
        (or modelled) with ``shape.local_experts`` experts of that many tokens each.
        Returns (D,) µs; a device with no tokens takes 0.
        """
        t = np.asarray(tokens_per_slot, dtype=np.float64)
        n = max(shape.local_experts, 1)
        launch = self.op_factors(op, dtype).launch_us
        flat = t.reshape(-1)
        per = np.zeros_like(flat)
        live = flat > 0
        if live.any():
            uniq, inv = np.unique(flat[live], return_inverse=True)
            share = np.maximum(self.time_us(op, shape, uniq, dtype) - launch, 0.0) / n
            per[live] = share[inv]
        busy = (t > 0).any(axis=1)
        return np.where(busy, launch + per.reshape(t.shape).sum(axis=1), 0.0)

    def time_us(
        self, op: str, shape: BenchShape, tokens: np.ndarray | float, dtype: str
    ) -> np.ndarray:
        """Time of one call of ``op`` for each entry of ``tokens`` (0 tokens → 0 µs)."""
        tok = np.atleast_1d(np.asarray(tokens, dtype=np.float64))
        out = np.zeros_like(tok)
        live = tok > 0
        if not live.any():
            return out
        meas = self._measured(op, shape, dtype)
        roof = self.roofline_us(op, shape, tok[live], dtype)
        if meas is None:
            out[live] = roof
            return out
        x = np.log(meas["tokens"].to_numpy(float))
        y = np.log(meas["median_us"].to_numpy(float))
        y = np.maximum.accumulate(y)  # times never fall as tokens grow
        lt = np.log(tok[live])
        inside = (lt >= x[0]) & (lt <= x[-1])
        res = np.empty(lt.size)
        if x.size >= 2:
            res[inside] = np.exp(PchipInterpolator(x, y, extrapolate=False)(lt[inside]))
        else:
            res[inside] = math.exp(y[0])
        for edge, mask in ((0, lt < x[0]), (-1, lt > x[-1])):
            if mask.any():  # roofline shape, pinned to the table's edge
                edge_tok = float(np.exp(x[edge]))
                pin = math.exp(y[edge]) / float(
                    self.roofline_us(op, shape, np.array([edge_tok]), dtype)[0]
                )
                res[mask] = roof[mask] * pin
        out[live] = res
        return out


def load_cost_model(device_dir: Path, hw: HardwareProfile | None = None) -> CostModel:
    """Calibrated cost model of a ``kernels/measured/<device>`` folder."""
    from moesim.kernels.tables import load_table

    return CostModel.from_table(load_table(device_dir), hw)


_TABLE_MODELS: dict[tuple[str, str], CostModel] = {}
"""Calibrated models of :func:`cost_model_for`, by (table folder, profile as JSON)."""


def cost_model_for(hw: HardwareProfile) -> CostModel:
    """The cost model of a hardware profile: calibrated on its measured tables when the
    profile names a ``kernels/measured/<kernel_tables>`` folder, else its roofline.

    A calibrated model is kept for the folder and the profile's whole content (every
    figure, not its name): a profile with the same name but other figures gets its own.
    """
    if hw.kernel_tables is None:
        return CostModel(hw=hw)
    from moesim.paths import repo_root

    folder = str(repo_root() / "kernels" / "measured" / hw.kernel_tables)
    key = (folder, hw.model_dump_json())
    if key not in _TABLE_MODELS:
        _TABLE_MODELS[key] = load_cost_model(Path(folder), hw)
    return _TABLE_MODELS[key]
