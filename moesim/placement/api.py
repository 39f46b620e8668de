"""Plan an expert placement, or replay a trace's re-plans, from Python: what ``moesim place``
and ``moesim replan`` compute, without the command line.

>>> import numpy as np
>>> from moesim.placement.api import plan_placement
>>> plan = plan_placement(loads=np.array([[4.0, 1.0, 2.0, 1.0]]), nodes=1,
...                       devices_per_node=2, strategy="greedy")
>>> plan.device_loads.tolist()
[[5.0, 3.0]]
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from moesim.errors import InputError

if TYPE_CHECKING:
    from moesim.model.shapes import ModelShape
    from moesim.placement.base import Placement
    from moesim.traces.store import RoutingTrace

__all__ = [
    "PlacementPlan",
    "Refinement",
    "ReplanReplay",
    "load_loads",
    "parse_window",
    "plan_placement",
    "replan_trace",
]


def _check_choices(strategy: str, replica_choice: str, groups: int | None = None) -> None:
    """A one-line error for an unknown planner or replica choice, or --groups given to a
    planner without expert groups."""
    from moesim.placement.choice import REPLICA_CHOICES
    from moesim.placement.planners import STRATEGIES

    if strategy not in STRATEGIES:
        raise InputError(
            f"unknown strategy; valid: {', '.join(STRATEGIES)}", field="strategy", value=strategy
        )
    if replica_choice not in REPLICA_CHOICES:
        raise InputError(
            f"valid: {', '.join(REPLICA_CHOICES)}", field="replica-choice", value=replica_choice
        )
    if groups is not None and strategy not in ("eplb-hierarchical", "balanced-hierarchical"):
        raise InputError(
            f"expert groups are for eplb-hierarchical and balanced-hierarchical, not {strategy}",
            field="groups",
            value=groups,
        )


def _model_slots(
    model: str, hardware: str, precision: str, num_experts: int
) -> tuple[ModelShape, int]:
    """The preset ``model`` (its expert count checked against the data's) and the expert
    slots per device that fit ``hardware``'s memory."""
    from moesim.hardware import get_profile
    from moesim.model.shapes import get_preset
    from moesim.placement.memory import max_expert_slots

    shape = get_preset(model)
    if shape.num_experts != num_experts:
        raise InputError(
            f"the loads have {num_experts} experts, {shape.name} has {shape.num_experts}",
            field="model",
            value=model,
        )
    return shape, max_expert_slots(shape, get_profile(hardware), precision)


def parse_window(text: str, num_tokens: int) -> tuple[int, int]:
    """``START:END`` token indices (END exclusive; either side may be empty)."""
    start_s, sep, end_s = text.partition(":")
    try:
        start = int(start_s) if start_s.strip() else 0
        end = int(end_s) if end_s.strip() else num_tokens
    except ValueError:
        raise InputError("expected START:END token indices", field="window", value=text) from None
    if not sep or not 0 <= start < end <= num_tokens:
        raise InputError(
            f"expected START:END with 0 <= START < END <= {num_tokens}", field="window", value=text
        )
    return start, end


def load_loads(
    path: Path, *, model: str | None = None, domain: str | None = None
) -> tuple[np.ndarray, list[int] | None]:
    """(L, E) expert loads from a .npy or .csv array, or a counts JSON (``model``: its first
    model by default; ``domain``: all domains summed by default), and the model layer of
    each row where the file names them (a counts JSON), else None."""
    if not path.is_file():
        raise InputError("file not found", file=path)
    suffix = path.suffix.lower()
    layers: list[int] | None = None
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"not a .npy array ({exc})", file=path) from None
        if not isinstance(arr, np.ndarray):  # np.load opened an .npz archive
            raise InputError("an .npz archive, not an .npy array", file=path)
        if arr.dtype.kind not in "iuf":
            raise InputError("expected an integer or float array", file=path, value=str(arr.dtype))
    elif suffix == ".csv":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty file: the size check below says so
                arr = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as exc:
            raise InputError(f"not a numeric CSV ({exc})", file=path) from None
    elif suffix == ".json":
        from moesim.traces.importers import load_counts_json

        layers, arr = load_counts_json(path, model=model, domain=domain)
    else:
        raise InputError("expected a .npy, .csv or counts .json file", file=path)
    return _checked_loads(arr, path), layers


def _checked_loads(loads: Any, path: Path | None) -> np.ndarray:
    """``loads`` as an (L, E) float64 array: a 1-D array is one layer; every load finite
    and >= 0 (``path``: the file they came from, for the error)."""
    arr = np.asarray(loads, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise InputError("expected a layers x experts array", file=path, value=list(arr.shape))
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        li, ei = (int(x) for x in np.argwhere(bad)[0])
        raise InputError(
            "loads must be finite and >= 0",
            file=path,
            field=f"layer {li}, expert {ei}",
            value=float(arr[li, ei]),
        )
    return arr


class Refinement(Protocol):
    """What a ``refine`` step of :func:`plan_placement` returns (as
    :func:`moesim.sim.refine.refine_for_scenario` does)."""

    @property
    def placement(self) -> Placement: ...
    @property
    def mode(self) -> str: ...
    @property
    def step_time_us_before(self) -> float: ...
    @property
    def step_time_us_after(self) -> float: ...
    @property
    def swaps_kept(self) -> int: ...


def _read(trace: str | Path | RoutingTrace) -> RoutingTrace:
    """``trace`` itself, or the trace read from that folder."""
    from moesim.traces.store import RoutingTrace, read_trace

    return trace if isinstance(trace, RoutingTrace) else read_trace(trace)


@dataclass(frozen=True)
class PlacementPlan:
    """A planned placement and what ``moesim place`` prints of it."""

    placement: Placement
    #: (L, E) expert loads it was planned from (the forecast, where one was made)
    loads: np.ndarray
    #: the model layer of each of the L layers, where the input names them
    layers: list[int] | None
    nodes: int
    devices_per_node: int
    #: planned balance and its settings, under the names ``moesim place --json`` prints
    metrics: dict[str, Any]

    @property
    def device_loads(self) -> np.ndarray:
        """(L, D) planned load of each device: each expert's load split evenly over its
        replicas."""
        from moesim.placement.metrics import planned_device_loads

        return planned_device_loads(self.placement, self.loads)

    def to_json(self) -> dict[str, Any]:
        """``{"layers": [{"layer", "devices": [[expert, ...], ...]}, ...], "metrics": ...}``,
        as ``moesim place --json`` prints it."""
        from moesim.placement.io import placement_dict

        data = placement_dict(self.placement, self.layers)
        return {"layers": data["layers"], "metrics": self.metrics}

    def write(self, path: str | Path) -> None:
        """Write the placement YAML that scenarios and ``--previous`` read."""
        from moesim.placement.io import write_placement

        write_placement(
            Path(path),
            self.placement,
            self.layers,
            nodes=self.nodes,
            devices_per_node=self.devices_per_node,
        )


def plan_placement(
    *,
    trace: str | Path | RoutingTrace | None = None,
    window: str | tuple[int, int] | None = None,
    loads: str | Path | np.ndarray | None = None,
    counts_model: str | None = None,
    domain: str | None = None,
    nodes: int = 1,
    devices_per_node: int = 8,
    redundant: int = 0,
    strategy: str = "eplb-global",
    groups: int | None = None,
    model: str | None = None,
    hardware: str = "H100-SXM",
    precision: str = "bf16",
    replica_choice: str = "nearest",
    previous: str | Path | None = None,
    max_moved_share: float | None = None,
    forecast: bool = True,
    refine: Callable[[Placement], Refinement] | None = None,
) -> PlacementPlan:
    """Plan where each expert (and its replicas) lives, as ``moesim place`` does.

    Give exactly one of ``trace`` (a trace folder or a :class:`RoutingTrace`, optionally
    its tokens ``window`` ``"START:END"`` or ``(START, END)``) or ``loads`` (an (L, E) or
    (E,) array of expert loads, or a .npy, .csv or counts .json file; ``counts_model`` and
    ``domain`` pick from a counts JSON). A window with as many tokens before it is planned
    from the load forecast of both windows unless ``forecast`` is False. ``model``
    (a preset) caps the slots per device at what fits ``hardware``'s memory in
    ``precision``. ``previous`` (a placement YAML) with ``max_moved_share`` re-plans moving
    at most that share of slots. ``refine`` then improves the plan, e.g. on a scenario's
    simulated step time: ``functools.partial(moesim.sim.refine.refine_for_scenario,
    scenario_path=PATH, iterations=50, seed=0)`` (what ``--refine-scenario`` does; the
    placement library itself never imports the simulator). Bad input raises
    :class:`~moesim.errors.InputError`.
    """
    from moesim.placement.metrics import expert_loads, planned_balance, score_window
    from moesim.placement.planners import plan, ready

    if (trace is None) == (loads is None):
        raise InputError("give exactly one of --trace or --loads", field="trace")
    if trace is not None and (counts_model or domain):
        raise InputError(
            "--counts-model and --domain read a counts JSON given as --loads", field="trace"
        )
    _check_choices(strategy, replica_choice, groups)
    if isinstance(window, tuple):
        window = f"{window[0]}:{window[1]}"
    ids = None
    before: tuple[int, int] | None = None
    layer_names: list[int] | None = None
    if trace is not None:
        tr = _read(trace)
        start, end = parse_window(window, tr.num_tokens) if window else (0, tr.num_tokens)
        ids = tr.expert_ids[:, start:end]  # (L, n, K)
        e = tr.num_experts
        w = expert_loads(ids, e).astype(np.float64)
        if forecast and start >= end - start:
            from moesim.placement.replan import forecast_loads

            before = (2 * start - end, start)
            w = forecast_loads(
                expert_loads(tr.expert_ids[:, before[0] : before[1]], e).astype(np.float64), w
            )
        layer_names = list(tr.layers)
    else:
        assert loads is not None
        if window:
            raise InputError("--window needs --trace", field="window", value=window)
        if isinstance(loads, np.ndarray):
            w = _checked_loads(loads, None)
        else:
            w, layer_names = load_loads(Path(loads), model=counts_model, domain=domain)
    mem = None
    if model is not None:
        _, mem = _model_slots(model, hardware, precision, w.shape[1])
    co = cross = None
    if strategy == "affinity" and ids is not None:
        from moesim.placement.affinity import coactivation

        co, cross = coactivation(ids, w.shape[1])
    ready(strategy)
    t0 = time.perf_counter()
    p = plan(
        w,
        strategy,
        nodes=nodes,
        devices_per_node=devices_per_node,
        redundant=redundant,
        max_slots_per_device=mem,
        groups=groups,
        coactivation=co,
        cross_layer=cross,
    )
    old = None
    if previous is not None:
        from moesim.placement.io import read_placement
        from moesim.placement.replan import incremental

        previous = Path(previous)
        old, _ = read_placement(
            previous,
            num_experts=w.shape[1],
            num_layers=w.shape[0],
            num_devices=p.num_devices,
            max_slots_per_device=mem,
            devices_per_node=devices_per_node,
        )
        if old.slots.shape != p.slots.shape:
            raise InputError(
                f"has {old.slots.shape[2]} slots per device, the plan {p.slots.shape[2]}",
                file=previous,
                field="layers[0].devices[0]",
                value=old.slots.shape[2],
            )
        if max_moved_share is not None:
            p = incremental(
                old,
                w,
                max_moved_share=max_moved_share,
                target=p,
                devices_per_node=devices_per_node,
            )
    elif max_moved_share is not None:
        raise InputError("--max-moved-share needs --previous", field="max-moved-share")
    plan_ms = (time.perf_counter() - t0) * 1e3
    refined = None
    if refine is not None:
        refined = refine(p)
        p = refined.placement
    bal = planned_balance(p, w)
    metrics: dict[str, Any] = {
        "strategy": strategy,
        **({"groups": groups} if groups is not None else {}),
        "devices": p.num_devices,
        "slots_per_device": int(p.slots.shape[2]),
        "redundant": redundant,
        "planned_balance_mean": round(float(bal.mean()), 6),
        "planned_balance_max": round(float(bal.max()), 6),
        "plan_ms": round(plan_ms, 3),
    }
    if before is not None:
        metrics["forecast_from_window"] = f"{before[0]}:{before[1]}"
    if mem is not None:
        metrics["slots_fit_memory"] = mem
    if refined is not None:
        metrics |= {
            "refine_mode": refined.mode,
            "step_time_us_before": round(refined.step_time_us_before, 3),
            "step_time_us_after": round(refined.step_time_us_after, 3),
            "refine_swaps_kept": refined.swaps_kept,
        }
    if old is not None:
        from moesim.placement.metrics import moved_share

        metrics["moved_share"] = round(moved_share(old, p), 6)
    if ids is not None:
        d = p.num_devices
        batch = (ids.shape[1] // d) * d
        if batch:
            sc = score_window(
                p,
                ids[:, :batch],
                devices_per_node=devices_per_node,
                tokens_per_batch=batch,
                replica_choice=replica_choice,  # type: ignore[arg-type]
            ).summary()
            metrics |= {
                "replica_choice": replica_choice,
                "routed_balance_mean": round(sc["balance_mean"], 6),
                "remote_nodes_per_token": round(sc["remote_nodes_per_token"], 6),
            }
    return PlacementPlan(p, w, layer_names, nodes, devices_per_node, metrics)


@dataclass(frozen=True)
class ReplanReplay:
    """A trace replayed in windows, as ``moesim replan`` prints it."""

    #: one row per scored window and mode: window, tokens ("START:END"), mode, and the
    #: figures (balance_mean, balance_p99, remote_nodes_per_token, moved_share, with a
    #: model migration_bytes and inter_node_bytes_per_batch)
    windows: list[dict[str, Any]]
    #: per mode, the mean of each figure over the scored windows
    mean: dict[str, dict[str, float]]
    #: the modes in order: static, full, and limit-SHARE with a move limit
    modes: list[str]
    #: whole windows in the trace
    num_windows: int
    #: tokens per scored batch
    tokens_per_batch: int

    def to_json(self) -> dict[str, Any]:
        """``{"windows": [...], "mean": {...}}``, as ``moesim replan --json`` prints it."""
        return {"windows": self.windows, "mean": self.mean}


def replan_trace(
    trace: str | Path | RoutingTrace,
    *,
    window_tokens: int,
    nodes: int = 1,
    devices_per_node: int = 8,
    redundant: int = 0,
    strategy: str = "eplb-global",
    groups: int | None = None,
    max_moved_share: float | None = None,
    replica_choice: str = "nearest",
    tokens_per_batch: int | None = None,
    forecast: bool = True,
    model: str | None = None,
    hardware: str = "H100-SXM",
    precision: str = "bf16",
) -> ReplanReplay:
    """Replay ``trace`` (a folder or a :class:`RoutingTrace`) in windows of
    ``window_tokens``, as ``moesim replan`` does: plan from each window, score on the next,
    against a static plan made from the first window, and with ``max_moved_share`` re-plans
    that move at most that share of slots. ``tokens_per_batch`` (a multiple of the
    devices; default the window, at most 2,048, rounded down to one) is the scored batch;
    ``model`` adds the expert weight bytes moved and the inter-node bytes per batch. Bad
    input raises :class:`~moesim.errors.InputError`.
    """
    from moesim.placement.replan import planner_for, replay, replay_means

    _check_choices(strategy, replica_choice, groups)
    tr = _read(trace)
    if tr.num_tokens < 2 * window_tokens:
        raise InputError(
            f"the trace has {tr.num_tokens} tokens: fewer than two windows",
            field="window-tokens",
            value=window_tokens,
        )
    d = nodes * devices_per_node
    batch = tokens_per_batch or min(window_tokens, 2048) // d * d
    if batch > window_tokens or batch < d or batch % d:
        raise InputError(
            f"need a multiple of the {d} devices, at most a window ({window_tokens} tokens)",
            field="tokens-per-batch" if tokens_per_batch else "window-tokens",
            value=tokens_per_batch or window_tokens,
        )
    mem = None
    moved_bytes = wire_bytes = 0.0
    if model is not None:
        from moesim.costs.roofline import bytes_per_assignment
        from moesim.placement.memory import expert_bytes

        shape, mem = _model_slots(model, hardware, precision, tr.num_experts)
        moved_bytes = expert_bytes(shape, precision)
        wire_bytes = 2 * bytes_per_assignment(shape.d_model, "bf16")  # dispatch + combine
    planner = planner_for(
        strategy,
        nodes=nodes,
        devices_per_node=devices_per_node,
        redundant=redundant,
        max_slots_per_device=mem,
        groups=groups,
    )
    modes: list[tuple[str, bool, float | None]] = [("static", True, None), ("full", False, None)]
    if max_moved_share is not None:
        modes.append((f"limit-{max_moved_share:g}", False, max_moved_share))
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, float]] = {}
    keys = ["balance_mean", "balance_p99", "remote_nodes_per_token", "moved_share"]
    whole = ("migration_bytes", "inter_node_bytes_per_batch")  # bytes: whole numbers per row
    if model is not None:
        keys += whole
    for mode, static, share in modes:
        results = replay(
            tr.expert_ids,
            window_tokens,
            planner,
            devices_per_node=devices_per_node,
            tokens_per_batch=batch,
            replica_choice=replica_choice,  # type: ignore[arg-type]
            expert_bytes=moved_bytes,
            bytes_per_assignment=wire_bytes,
            max_moved_share=share,
            static=static,
            forecast=forecast,
            num_experts=tr.num_experts,
        )
        for r in results:
            figures = r.score | {"moved_share": r.moved_share, "migration_bytes": r.migration_bytes}
            rows.append(
                {
                    "window": r.window,
                    "tokens": f"{r.window * window_tokens}:{(r.window + 1) * window_tokens}",
                    "mode": mode,
                }
                | {k: round(figures[k], None if k in whole else 6) for k in keys}
            )
        means = replay_means(results)
        summary[mode] = {k: round(means[k], 6) for k in keys}
    return ReplanReplay(
        rows, summary, [m for m, _, _ in modes], tr.num_tokens // window_tokens, batch
    )
