"""Calibrating a hardware profile to a user's profiler trace: ``moesim calibrate``.

The trace (a Kineto trace of an MoE training step, :mod:`moesim.kernels.profile_import`)
must mark its sublayers with ``record_function`` ranges named ``attn``, ``mlp``,
``dispatch`` or ``combine`` followed by the pass, ``(F)``, ``(B)`` or ``(W)`` (forward,
backward of inputs, backward of weights), as DeepSeek's DualPipe profiles do. Each
range's n-th occurrence is layer n. Per layer, the kernels give one time per *class*:

========================  ===================================  ============================
class                     kernels (trace)                      the simulator's op(s)
========================  ===================================  ============================
dispatch                  dispatch kernels in ``dispatch(F)``  ``dispatch``
combine                   combine kernels in ``combine(F)``    ``combine``
gradient dispatch         dispatch kernels in ``combine(B)``   ``combine bwd``
gradient combine          combine kernels in ``dispatch(B)``   ``dispatch bwd``
grouped GEMM forward      GEMMs in ``mlp(F)``                  ``experts`` + ``shared experts``
grouped GEMM backward     GEMMs in ``mlp(B)`` and ``mlp(W)``   their ``bwd`` ops
attention                 attention kernels in ``attn(F)``     the attention scores
========================  ===================================  ============================

The simulator's times come from the scenario the trace ran (its model, cluster,
tokens, dispatcher), on its own path: one MoE layer's program
(:func:`moesim.sim.program.build_program`), as a simulation times it, on the given rank.

:func:`calibrate_profile` fits, on the layers ``fit_layers``:

* ``efficiency.comm_interference``: GEMMs of the same place in their layer seen with
  different shares of their time beside a communication kernel (at least 0.3 apart):
  the median slope of their time over that share;
* ``efficiency.gemm`` (``gemm_fp8`` for FP8 compute): the forward GEMMs' total;
* ``efficiency.expert_backward``: the backward GEMMs' total;
* ``efficiency.attention``: the attention kernels;
* ``efficiency.scale_out`` and ``scale_out.alltoall_floor_us`` (or the scale-up pair on
  a single-node trace): the four all-to-alls, ``t = floor + port time / efficiency``,
  by least squares; the all-to-all floor is what the fitted floor has beyond the
  simulator's own (the path's latency, the dispatcher's launches and round trips), a
  cost per all-to-all call only: link latencies, which every transfer pays, stay.

It returns the derived profile, which records its provenance (:class:`Calibration`), and
the errors per class on the other layers before and after.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from moesim.costs.fit import with_efficiency
from moesim.errors import InputError
from moesim.hardware import MAX_FACTOR, MIN_EFFICIENCY, Calibration, HardwareProfile
from moesim.kernels.profile_import import ProfileSummary, import_profile

__all__ = [
    "CLASSES",
    "CalibrationResult",
    "calibrate_profile",
    "class_errors",
    "first_routings",
    "measured_classes",
    "predicted_classes",
    "prepare_for_calibration",
]

_RANGE = re.compile(r"^(attn|mlp|dispatch|combine)\((F|B|W)\)$")
_COMM = ("dispatch", "combine", "ep_control")

#: class -> (sublayer, passes, kernel classes) in the trace, (phases) in the simulator
CLASSES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "dispatch": ("dispatch", ("F",), ("dispatch",), ("dispatch",)),
    "combine": ("combine", ("F",), ("combine",), ("combine",)),
    "gradient dispatch": ("combine", ("B",), ("dispatch",), ("combine bwd",)),
    "gradient combine": ("dispatch", ("B",), ("combine",), ("dispatch bwd",)),
    "grouped GEMM forward": ("mlp", ("F",), ("grouped_gemm",), ("experts", "shared experts")),
    "grouped GEMM backward": (
        "mlp",
        ("B", "W"),
        ("grouped_gemm",),
        ("experts bwd", "shared experts bwd"),
    ),
    "attention": ("attn", ("F",), ("attention",), ()),
}
_DISPATCH_WAY = ("dispatch", "gradient dispatch")
_COMBINE_WAY = ("combine", "gradient combine")


def _overlap(k: pd.DataFrame) -> np.ndarray:
    """Share of each kernel's time spent beside a communication kernel (another stream)."""
    comm = k[k["class"].isin(_COMM)]
    a = comm["ts_us"].to_numpy()
    b = a + comm["dur_us"].to_numpy()
    s = k["ts_us"].to_numpy()[:, None]
    e = s + k["dur_us"].to_numpy()[:, None]
    both = np.clip(np.minimum(b[None, :], e) - np.maximum(a[None, :], s), 0, None).sum(axis=1)
    return np.where(k["dur_us"].to_numpy() > 0, both / k["dur_us"].to_numpy(), 0.0)


def _ranges(summary: ProfileSummary) -> pd.DataFrame:
    """The kernels inside the sublayer ranges, with sublayer, pass, layer and overlap."""
    k = summary.kernels
    parsed = k["annotation"].str.extract(_RANGE.pattern)
    k = k.assign(sublayer=parsed[0], pass_=parsed[1], overlap=_overlap(k))
    k = k[k["sublayer"].notna() & k["annotation_ts_us"].notna()]
    if k.empty:
        raise InputError(
            "no kernel inside a sublayer range (record_function 'attn(F)', 'mlp(B)', "
            "'dispatch(F)', ...): calibration needs them to tell layers and passes apart",
            file=summary.path,
            field="traceEvents",
            value="no sublayer ranges",
        )
    # the n-th occurrence of a range is layer n
    starts = k[["annotation", "annotation_ts_us"]].drop_duplicates()
    starts = starts.assign(layer=starts.groupby("annotation")["annotation_ts_us"].rank("dense"))
    k = k.merge(starts, on=["annotation", "annotation_ts_us"], how="left")
    return k.assign(layer=(k["layer"] - 1).astype(int))


def measured_classes(summary: ProfileSummary) -> pd.DataFrame:
    """One row per (class, layer): the summed kernel time ``time_us`` of that class in
    that layer (see the module's table) and its kernels' mean ``overlap``."""
    return _classes(_ranges(summary))


def _classes(k: pd.DataFrame) -> pd.DataFrame:
    """:func:`measured_classes` of the kernels :func:`_ranges` found."""
    rows = []
    for name, (sub, passes, kclasses, _) in CLASSES.items():
        sel = k[(k["sublayer"] == sub) & k["pass_"].isin(passes) & k["class"].isin(kclasses)]
        for layer, g in sel.groupby("layer"):
            rows.append(
                {
                    "class": name,
                    "layer": int(str(layer)),
                    "time_us": float(g["dur_us"].sum()),
                    "kernels": len(g),
                    "overlap": float(np.average(g["overlap"], weights=g["dur_us"])),
                }
            )
    return pd.DataFrame(rows, columns=["class", "layer", "time_us", "kernels", "overlap"])


def _interference(k: pd.DataFrame, fit_layers: set[int]) -> float | None:
    """Median slope of a GEMM's time over its share beside communication, between the
    same GEMM (sublayer, pass, position in its range) in two fit layers whose shares
    differ by 0.3 or more, among the kernels :func:`_ranges` found; None where no such
    pair exists."""
    g = k[(k["class"] == "grouped_gemm") & k["layer"].isin(fit_layers)]
    g = g.assign(pos=g.groupby(["annotation", "annotation_ts_us"]).cumcount())
    slopes = []
    for _, same in g.groupby(["annotation", "pos"]):
        r = same.sort_values("overlap")
        lo, hi = r.iloc[0], r.iloc[-1]
        if hi["overlap"] - lo["overlap"] >= 0.3 and lo["dur_us"] > 0:
            slopes.append((hi["dur_us"] / lo["dur_us"] - 1) / (hi["overlap"] - lo["overlap"]))
    return max(float(np.median(slopes)), 0.0) if slopes else None


def first_routings(prep: Any, layers: int = 2) -> list[Any]:
    """The routing of the scenario's first ``layers`` MoE layers (step 0, microbatch 0),
    what :func:`predicted_classes` times."""
    from moesim.sim.replay import route_layer_at

    n_mb = 2 if prep.scenario.overlap else 1
    return [route_layer_at(prep, 0, li, 0, n_mb) for li in range(min(layers, len(prep.moe_layers)))]


def predicted_classes(
    prep: Any, hw: HardwareProfile, rank: int = 0, routed: list[Any] | None = None
) -> dict:
    """The simulator's time of each class on ``rank``: one MoE layer's training program
    on ``hw`` (mean over the layers ``routed``, default :func:`first_routings`), as
    :func:`moesim.sim.simulate.simulate_mode` builds it (with the SMs the dispatcher holds
    when the scenario overlaps microbatches)."""
    from moesim.costs.model import cost_model_for
    from moesim.costs.roofline import layer_costs
    from moesim.dispatchers import compute_slowdown
    from moesim.sim.program import apply_sm_share, build_program
    from moesim.topology import build_topology

    sc, shape = prep.scenario, prep.shape
    n_mb = 2 if sc.overlap else 1
    tokens = sc.tokens_per_device // n_mb
    net = sc.network
    topo = build_topology(
        hw,
        sc.cluster.num_devices,
        sc.cluster.devices_per_node,
        oversubscription=net.oversubscription,
        nodes_per_leaf=net.nodes_per_leaf,
    ).degrade_nics(sc.stragglers.degraded_nics)
    cluster = replace(prep.cluster, topology=topo, network="analytic")
    model = cost_model_for(hw)
    costs = layer_costs(
        shape, hw, tokens=tokens, sequence_length=sc.sequence_length, mode="training",
        dtype=sc.precision, model=model,
    )  # fmt: skip
    slow = compute_slowdown(hw, prep.dispatcher) if n_mb > 1 else 1.0
    out: dict[str, list[float]] = {name: [] for name in CLASSES}
    for li, one in enumerate(first_routings(prep) if routed is None else routed):
        layer = prep.moe_layers[li]
        prog = build_program(
            shape, hw, cluster, {layer: one}, costs, mode="training",
            tokens_per_device=tokens, sequence_length=sc.sequence_length, dtype=sc.precision,
            dispatcher=prep.dispatcher, model=model,
        )  # fmt: skip
        prog = apply_sm_share(prog, slow)
        by_phase = {op.phase: float(op.duration_us[rank]) for op in prog if op.layer == layer}
        for name, (*_, phases) in CLASSES.items():
            out[name].append(sum(by_phase.get(p, 0.0) for p in phases))
        out["attention"][-1] = costs.scores_us * slow
    return {name: float(np.mean(v)) for name, v in out.items()}


def prepare_for_calibration(scenario: Any, base_dir: Path, source: str | Path) -> Any:
    """The scenario prepared, with synthetic routing its model cut to its first two MoE
    layers: a class's time is per layer, so the other layers' routing would be drawn for
    nothing (a trace's layers must match the model's, so with a trace it stays whole)."""
    from moesim.model.shapes import get_preset
    from moesim.sim.prepare import prepare

    if scenario.routing.synthetic is None:
        return prepare(scenario, base_dir, source)
    shape = get_preset(scenario.model) if isinstance(scenario.model, str) else scenario.model
    moe = shape.moe_layer_indices()
    keep = moe[:2]
    cut = shape.model_copy(
        update={"num_layers": keep[-1] + 1, "moe_layers": keep if shape.moe_layers else None}
    )
    return prepare(scenario.model_copy(update={"model": cut}), base_dir, source)


def class_errors(measured: pd.DataFrame, predicted: dict[str, float]) -> pd.DataFrame:
    """Per class: the signed error of the prediction against each measured layer, and
    the median of their absolute values (``error``)."""
    rows = []
    for name, g in measured.groupby("class", sort=False):
        err = predicted[str(name)] / g["time_us"].to_numpy() - 1
        rows.append(
            {
                "class": name,
                "measured_us": float(g["time_us"].median()),
                "predicted_us": predicted[str(name)],
                "signed": [round(float(e), 4) for e in err],
                "error": float(np.median(np.abs(err))),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class CalibrationResult:
    """A derived profile, what changed, and the errors per class on the held-out layers."""

    profile: HardwareProfile
    changed: dict[str, tuple[float | None, float | None]]
    before: pd.DataFrame
    after: pd.DataFrame
    fit_layers: list[int]
    test_layers: list[int]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            return [
                {str(k): round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                for r in df.to_dict("records")
            ]

        return {
            "profile": self.profile.name,
            "changed": {k: list(v) for k, v in self.changed.items()},
            "fit_layers": self.fit_layers,
            "test_layers": self.test_layers,
            "before": records(self.before),
            "after": records(self.after),
            "median_error_before": float(self.before["error"].median()),
            "median_error_after": float(self.after["error"].median()),
            "max_error_after": float(self.after["error"].max()),
            "notes": self.notes,
        }


def _mean(measured: pd.DataFrame, name: str, layers: set[int]) -> float:
    g = measured[(measured["class"] == name) & measured["layer"].isin(layers)]
    return float(g["time_us"].mean()) if len(g) else math.nan


def _set(hw: HardwareProfile, section: str, **fields: float | None) -> HardwareProfile:
    if section == "efficiency":
        return with_efficiency(hw, **fields)
    block = getattr(hw, section)
    return hw.model_copy(update={section: block.model_copy(update=fields)})


def calibrate_profile(
    trace: str | Path,
    hw: HardwareProfile,
    prep: Any,
    *,
    fit_layers: list[int] | None = None,
    rank: int = 0,
) -> CalibrationResult:
    """Fit ``hw``'s factors to ``trace`` (see the module docstring) for the prepared
    scenario ``prep`` the trace ran; ``fit_layers``: the trace's layers fitted on (default
    its first half), the others held out."""
    summary = import_profile(trace)
    ranges = _ranges(summary)
    measured = _classes(ranges)
    layers = sorted(measured["layer"].unique().tolist())
    if len(layers) < 2:
        raise InputError(
            "calibration needs two layers or more (some fitted on, some held out)",
            file=summary.path,
            field="layers",
            value=len(layers),
        )
    fit = sorted(set(fit_layers)) if fit_layers is not None else layers[: len(layers) // 2]
    test = [la for la in layers if la not in fit]
    if not fit or not test or not set(fit) <= set(layers):
        raise InputError(
            f"give some of the trace's layers {layers}, leaving one or more out",
            field="fit-layers",
            value=",".join(map(str, fit)),
        )
    if not 0 <= rank < prep.cluster.num_devices:
        raise InputError(
            f"the scenario has devices 0..{prep.cluster.num_devices - 1}",
            field="rank",
            value=rank,
        )
    fit_set, test_set = set(fit), set(test)
    notes: list[str] = []
    base = hw
    fp8 = hw.runs_fp8(prep.scenario.precision)
    eff_field = "gemm_fp8" if fp8 else "gemm"

    routed = first_routings(prep)  # drawn once: every fit step times the same traffic

    def pred(p: HardwareProfile) -> dict[str, float]:
        return predicted_classes(prep, p, rank, routed)

    # 1. compute slowdown beside communication
    s = _interference(ranges, fit_set)
    if s is None:
        notes.append("comm_interference: no GEMM seen with and without communication beside it")
    else:
        hw = _set(hw, "efficiency", comm_interference=round(min(s, MAX_FACTOR), 4))
    # 2. GEMM efficiency: the forward GEMMs' total
    target = _mean(measured, "grouped GEMM forward", fit_set)
    if math.isfinite(target):

        def gemm_gap(e: float) -> float:
            p = _set(hw, "efficiency", **{eff_field: e})
            return math.log(pred(p)["grouped GEMM forward"] / target)

        if gemm_gap(0.02) > 0 > gemm_gap(1.0):
            hw = _set(hw, "efficiency", **{eff_field: round(brentq(gemm_gap, 0.02, 1.0), 4)})
        else:
            notes.append(f"{eff_field}: the forward GEMMs are out of reach of (0.02, 1]")
    # 3. expert backward over forward: linear in the factor
    target = _mean(measured, "grouped GEMM backward", fit_set)
    if math.isfinite(target):
        p1, p2 = (pred(_set(hw, "efficiency", expert_backward=b)) for b in (1.0, 2.0))
        slope = p2["grouped GEMM backward"] - p1["grouped GEMM backward"]
        b = 1.0 + (target - p1["grouped GEMM backward"]) / slope
        hw = _set(hw, "efficiency", expert_backward=round(min(max(b, 0.1), MAX_FACTOR), 4))
    # 4. attention scores: inversely proportional to their efficiency
    target = _mean(measured, "attention", fit_set)
    if math.isfinite(target):
        a0 = hw.efficiency.attention or hw.efficiency.gemm
        e = a0 * pred(hw)["attention"] / target
        if MIN_EFFICIENCY <= e <= 1:
            hw = _set(hw, "efficiency", attention=round(e, 4))
        else:
            notes.append(f"attention: fitted efficiency {e:.3f} is outside [{MIN_EFFICIENCY}, 1]")
    # 5. the all-to-alls: floor + port time / efficiency
    hw = _fit_network(hw, prep.scenario.cluster.nodes > 1, measured, fit_set, pred, notes)
    changed = _changed(base, hw)
    profile = hw.model_copy(
        update={
            "name": f"{base.name}-calibrated",
            "sources": {**base.sources}
            | {
                key: f"moesim calibrate: fitted to {Path(trace).name} (sha256 "
                f"{_sha256(trace)[:16]}...), layers {fit} of the trace"
                for key in changed
            },
            "calibration": Calibration(
                base=base.name,
                trace=Path(trace).name,
                trace_sha256=_sha256(trace),
                scenario=prep.scenario.name,
                fitted_on=f"layers {fit} of the trace (held out: {test})",
                changed={k: list(v) for k, v in changed.items()},
            ),
        }
    )
    held = measured[measured["layer"].isin(test_set)]
    return CalibrationResult(
        profile=profile,
        changed=changed,
        before=class_errors(held, pred(base)),
        after=class_errors(held, pred(profile)),
        fit_layers=fit,
        test_layers=test,
        notes=notes,
    )


def _fit_network(
    hw: HardwareProfile,
    across_nodes: bool,
    measured: pd.DataFrame,
    fit_set: set[int],
    pred: Callable[[HardwareProfile], dict[str, float]],
    notes: list[str],
) -> HardwareProfile:
    """Scale-out (or, on one node, scale-up) efficiency and all-to-all floor from the four
    all-to-alls; ``pred``: the simulator's class times on a profile."""
    tier = "scale_out" if across_nodes else "scale_up"
    names = [*_DISPATCH_WAY, *_COMBINE_WAY]
    t = np.array([_mean(measured, n, fit_set) for n in names])
    if not np.isfinite(t).all():
        notes.append(f"{tier}: the trace lacks one of the four all-to-alls")
        return hw
    e0 = getattr(hw.efficiency, tier)
    p_a = pred(hw)
    p_b = pred(_set(hw, "efficiency", **{tier: e0 / 2}))
    port = np.array([(p_b[n] - p_a[n]) * e0 for n in names])  # port time at efficiency 1
    if (port <= 0).any():
        notes.append(f"{tier}: the all-to-alls are not bound by its ports")
        return hw
    # t = floor + port / e: least squares in (floor, 1 / e)
    a = np.c_[np.ones(4), port]
    (floor, inv_e), *_ = np.linalg.lstsq(a, t, rcond=None)
    e = float(1 / inv_e) if inv_e > 0 else math.inf
    if not MIN_EFFICIENCY <= e <= 1:
        notes.append(f"{tier}: fitted efficiency {e:.3f} is outside [{MIN_EFFICIENCY}, 1]")
        return hw
    hw = _set(hw, "efficiency", **{tier: round(e, 4)})
    # what the floor has beyond the simulator's own (path latency, the dispatcher's
    # launches and round trips) is the tier's all-to-all floor; the link latency, which
    # every other transfer (the gradient all-reduce's ring steps) pays too, stays
    base = _set(hw, tier, alltoall_floor_us=None)
    p0 = pred(base)
    f0 = float(np.mean([p0[n] - port[i] / e for i, n in enumerate(names)]))
    if floor <= f0:
        notes.append(
            f"{tier}.alltoall_floor_us: fitted floor {floor:.1f} us is within the simulator's "
            f"own {f0:.1f} us"
        )
        return base
    return _set(hw, tier, alltoall_floor_us=round(float(floor - f0), 3))


def _changed(
    base: HardwareProfile, new: HardwareProfile
) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for section in ("efficiency", "scale_out", "scale_up"):
        a, b = getattr(base, section).model_dump(), getattr(new, section).model_dump()
        for key in b:
            if a[key] != b[key]:
                out[f"{section}.{key}"] = (a[key], b[key])
    return out


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
