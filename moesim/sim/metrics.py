"""What a run measured, from the engine's records and the routing: one row per (pass, layer,
device) (:func:`metrics_frame`), one row per MoE layer with balance, straggler and traffic
(:func:`layer_frame`, :func:`link_columns`), and the headline summary of a mode
(:func:`summary`). Pure functions of plain data; the engine never calls them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from moesim.balance import balance_ratio
from moesim.costs.memory import memory_per_device
from moesim.scenario import Stragglers
from moesim.sim.engine import Exchange, Op, Records
from moesim.sim.prepare import Prepared
from moesim.sim.routing import (
    LayerRouting,
    busiest_flow,
    cross_node_total,
)
from moesim.sim.stragglers import StreamLinks, layer_straggler, straggler_penalty
from moesim.topology.build import Topology

__all__ = ["layer_frame", "link_columns", "metrics_frame", "summary"]


def metrics_frame(
    program: list[Op],
    rec: Records,
    routed: dict[int, LayerRouting],
    step: int,
    devices_per_node: int,
    mode: str | None = None,
) -> pd.DataFrame:
    """One row per (pass, layer, device): time per category, wait, bytes, loads (routed:
    before capacity; device: processed, after drops); ``mode``: a first column of it."""
    n_dev = rec.start_us.shape[1]
    cats = ("expert_us", "dispatch_us", "combine_us", "other_us", "allreduce_us")
    # each op's (pass, layer) row group, in order of first appearance; its first and last op
    groups: dict[tuple[str, int], int] = {}
    group = np.empty(len(program), dtype=np.int64)
    first: list[int] = []
    last: list[int] = []
    by_cat: dict[str, list[int]] = {c: [] for c in cats}
    moved: list[int] = []  # exchanges that move bytes
    for i, op in enumerate(program):
        g = groups.setdefault((op.pass_, op.layer), len(groups))
        if g == len(first):
            first.append(i)
            last.append(i)
        last[g] = i
        group[i] = g
        by_cat[f"{op.category}_us"].append(i)
        if isinstance(op, Exchange) and op.sent_bytes.size:
            moved.append(i)
    if not groups:
        return pd.DataFrame({})

    def total(ops: list[int], values: np.ndarray) -> np.ndarray:
        """(groups, D): the ops' values summed per group, in program order."""
        out = np.zeros((len(groups), n_dev))
        np.add.at(out, group[ops], values)
        return out

    cols = {c: total(ops, rec.duration_us[ops]) for c, ops in by_cat.items()}
    cols["wait_us"] = total(list(range(len(program))), rec.wait_us)
    sent = [program[i].sent_bytes for i in moved]  # type: ignore[union-attr]
    recv = [program[i].recv_bytes for i in moved]  # type: ignore[union-attr]
    cols["bytes_sent"] = total(moved, np.array(sent).reshape(len(moved), n_dev))
    cols["bytes_recv"] = total(moved, np.array(recv).reshape(len(moved), n_dev))
    cols["start_us"] = rec.start_us[first] - rec.wait_us[first]
    cols["end_us"] = rec.end_us[last]
    loads: dict[str, list[np.ndarray]] = {"routed_load": [], "device_load": [], "dropped": []}
    zeros = np.zeros(n_dev, np.int64)
    for _, layer in groups:
        lr = routed.get(layer)
        loads["routed_load"].append(
            lr.routed_load if lr is not None and lr.routed_load is not None else zeros
        )
        loads["device_load"].append(lr.device_load if lr is not None else zeros)
        loads["dropped"].append(lr.dropped if lr is not None else zeros)
    n = len(groups)
    dev = np.arange(n_dev)
    frame = {} if mode is None else {"mode": np.full(n * n_dev, mode, dtype=object)}
    frame |= {
        "step": np.full(n * n_dev, step),
        "pass": np.repeat(np.array([p for p, _ in groups], dtype=object), n_dev),
        "layer": np.repeat(np.array([la for _, la in groups]), n_dev),
        "device": np.tile(dev, n),
        "node": np.tile(dev // devices_per_node, n),
    }
    frame |= {name: np.concatenate([np.asarray(x) for x in parts]) for name, parts in loads.items()}
    frame |= {name: col.reshape(-1) for name, col in cols.items()}
    # one frame from whole columns: far faster than a frame per (pass, layer) and a concat
    return pd.DataFrame(frame)


def layer_frame(
    routed: dict[int, LayerRouting],
    metrics: pd.DataFrame,
    step: int,
    cap: int | None,
    devices_per_node: int,
    wire_bytes: float,
    slots: np.ndarray | None = None,
    *,
    program: list[Op],
    rec: Records,
    base_us: np.ndarray | None = None,
    stragglers: Stragglers | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    mode: str | None = None,
) -> pd.DataFrame:
    """Per MoE layer (forward): balance before and after capacity, the straggler on the
    critical path with its cause and penalty, drops, traffic, and what lies behind the
    straggler (see :func:`_attribution`).

    Balance (:mod:`moesim.balance`): ``expert_balance`` (logical experts, before
    capacity), ``routed_balance`` (devices, before capacity), ``processed_balance``
    (devices, after drops), and ``dropless_capacity_factor``, the smallest capacity factor
    that drops nothing. Straggler (:mod:`moesim.sim.stragglers`): ``straggler_device``,
    ``straggler_cause``, ``straggler_phase`` and ``straggler_penalty`` of that phase
    ((max − mean) / mean of per-device time in it).

    ``wire_bytes``: bytes of one assignment's dispatch plus its combine; ``slots``: (L, D, S)
    experts hosted per device, per MoE layer (the placement); ``program`` / ``rec``: the
    step's ops and records; ``base_us``: (num_ops, D) op times before injected slowness;
    ``columns``: further columns, one value per layer in ``routed``'s order, put last (e.g.
    :func:`link_columns`); ``mode``: a first column of it.
    """
    st = stragglers or Stragglers()
    out = []
    fwd = np.flatnonzero(
        (metrics["pass"].to_numpy() == "forward") & (metrics["step"].to_numpy() == step)
    )
    # rows ordered by (layer, device) once; each layer is a slice of these arrays
    f_layer, f_dev = metrics["layer"].to_numpy()[fwd], metrics["device"].to_numpy()[fwd]
    order = np.lexsort((f_dev, f_layer))
    f_layer, fwd = f_layer[order], fwd[order]
    phase_us: dict[str, np.ndarray] = {}  # a phase's time on those rows, read on first use
    layer_ops: dict[int, list[int]] = {}
    for i, op in enumerate(program):
        if op.pass_ == "forward" and op.layer in routed:
            layer_ops.setdefault(op.layer, []).append(i)
    links = StreamLinks.of(program)
    mean_us = rec.duration_us.mean(axis=1)

    def _phase(phase: str) -> np.ndarray:
        if phase not in phase_us:
            phase_us[phase] = metrics[f"{phase}_us"].to_numpy()[fwd]
        return phase_us[phase]

    # each layer's rows: a slice of those arrays
    at = np.array(list(routed), dtype=np.int64)
    lo, hi = np.searchsorted(f_layer, at).tolist(), np.searchsorted(f_layer, at + 1).tolist()
    for li, (layer, lr) in enumerate(routed.items()):
        rows = slice(lo[li], hi[li])
        load = lr.device_load
        assert lr.expert_load is not None and lr.routed_load is not None
        cross = lr.cross_node_copies
        if cross is None:
            assert lr.copies is not None
            cross = cross_node_total(lr.copies, devices_per_node)
        hosted = None if slots is None else slots[li]
        strag = layer_straggler(
            program,
            rec,
            layer_ops[layer],
            base_us=base_us,
            slow_devices=st.slow_devices,
            jitter=st.jitter,
            degraded_nics=st.degraded_nics,
            links=links,
            mean_us=mean_us,
        )
        out.append(
            ({} if mode is None else {"mode": mode})
            | {
                "step": step,
                "layer": layer,
                "expert_balance": balance_ratio(lr.expert_load),
                "routed_balance": balance_ratio(lr.routed_load),
                "processed_balance": balance_ratio(load),
                "dropless_capacity_factor": float(lr.dropless_capacity_factor),
                "straggler_device": strag.device,
                "straggler_cause": strag.cause,
                "straggler_phase": strag.phase,
                "straggler_penalty": straggler_penalty(_phase(strag.phase)[rows]),
                "straggler_op": program[strag.op].name if strag.op >= 0 else "",
                "straggler_op_phase": program[strag.op].phase if strag.op >= 0 else "",
                "straggler_op_microbatch": program[strag.op].microbatch if strag.op >= 0 else 0,
                "straggler_excess_us": strag.excess_us,
                "last_device": strag.gate_device,
                "max_device_load": int(load.max()),
                "mean_device_load": float(load.mean()),
                "dropped": int(lr.dropped.sum()),
                "rerouted": lr.rerouted,
                "assignments": lr.assignments,
                "drop_rate": float(lr.dropped.sum() / lr.assignments),
                "slot_capacity": cap,
                "cross_node_copies": int(cross),
                "cross_node_bytes": float(cross * wire_bytes),
            }
            | _attribution(lr, hosted, strag.device, wire_bytes)
        )
    if not out:
        return pd.DataFrame()
    # one frame from whole columns (every row has the same keys, in the same order): far
    # faster than a frame from a list of rows, and the same frame
    cols = {name: [row[name] for row in out] for name in out[0]}
    for name, values in (columns or {}).items():
        cols[name] = [value for _, value in zip(out, values, strict=True)]
    return pd.DataFrame(cols)


def _attribution(
    lr: LayerRouting, slots: np.ndarray | None, straggler: int, wire_bytes: float
) -> dict[str, Any]:
    """The straggler's most loaded expert and the busiest flow of one layer step.

    ``slots``: (D, S) experts hosted per device. The busiest flow is the (src, dst) pair
    with the most dispatched token copies; its bytes are that dispatch plus the combine
    that returns the same copies.
    """
    per_slot = lr.expert_tokens[straggler]
    hot = int(np.argmax(per_slot))  # every device has a slot: D x S >= E >= 1
    flow = lr.busiest_flow
    if flow is None:
        assert lr.copies is not None
        flow = busiest_flow(lr.copies)
    src, dst, copies = flow
    return {
        "straggler_expert": int(slots[straggler, hot]) if slots is not None else -1,
        "straggler_expert_tokens": float(per_slot[hot]),
        "straggler_load": int(lr.device_load[straggler]),
        "busiest_pair_src": int(src),
        "busiest_pair_dst": int(dst),
        "busiest_pair_bytes": float(copies * wire_bytes),
    }


def _link_name(topo: Topology, i: int) -> str:
    """A link as people name it, e.g. ``leaf (rail 7, group 0) → device 15``."""

    def end(node: tuple[Any, ...]) -> str:
        kind, *ids = node
        if kind == "dev":
            return f"device {ids[0]}"
        if kind == "leaf":
            return f"leaf (rail {ids[0]}, group {ids[1]})"
        return f"{'NVSwitch' if kind == 'nvswitch' else kind} {' '.join(map(str, ids))}"

    a, b = topo.link_name(i)
    return f"{end(a)} → {end(b)}"


def link_columns(
    routed: dict[int, LayerRouting], topo: Topology, dispatch_bytes: float
) -> dict[str, list[Any]]:
    """Per MoE layer (in ``routed`` order): the fabric link the dispatch loads most, its
    dispatch bytes and the time they take it at its achievable bandwidth (NaN / "" when
    the cluster is too large to route every pair, see ``LINK_LOADS_MAX_DEVICES``)."""
    cols: dict[str, list[Any]] = {
        "busiest_link": [],
        "busiest_link_bytes": [],
        "busiest_link_us": [],
    }
    for lr in routed.values():
        link = lr.busiest_link
        if link is None:
            cols["busiest_link"].append("")
            cols["busiest_link_bytes"].append(float("nan"))
            cols["busiest_link_us"].append(float("nan"))
            continue
        i, copies = link
        nbytes = copies * dispatch_bytes
        cols["busiest_link"].append(_link_name(topo, i))
        cols["busiest_link_bytes"].append(nbytes)
        cols["busiest_link_us"].append(nbytes / (float(topo.capacity_gbps[i]) * 1e3))
    return cols


def summary(
    prep: Prepared,
    mode: str,
    mdf: pd.DataFrame,
    ldf: pd.DataFrame,
    records: list[Records],
    program: list[Op],
    step_times: list[float],
) -> dict[str, Any]:
    """Headline figures of the last step (all steps' times are listed too)."""
    sc = prep.scenario
    last = records[-1]
    end = last.end_us.max(axis=0)  # every device's finish time
    critical = int(np.argmax(end))
    step_time = float(end[critical])
    breakdown = {
        "expert_us": 0.0,
        "dispatch_us": 0.0,
        "combine_us": 0.0,
        "allreduce_us": 0.0,
        "other_us": 0.0,
    }
    for i, op in enumerate(program):
        breakdown[f"{op.category}_us"] += float(last.duration_us[i, critical])
    # idle time is what no op covers; with two-stream overlap, busy time counted twice
    # is reported as overlapped, so busy parts + waiting - overlapped = step time
    busy = _union_us(last.start_us[:, critical], last.end_us[:, critical])
    breakdown["wait_us"] = step_time - busy
    overlapped = sum(v for k, v in breakdown.items() if k != "wait_us") - busy
    # without overlap the two sums are equal: keep rounding noise (1e-13 µs) out of the figure
    breakdown["overlapped_us"] = overlapped if abs(overlapped) > 1e-6 * max(busy, 1.0) else 0.0
    # the last step's rows, by layer
    lastl = np.flatnonzero(ldf["step"].to_numpy() == sc.steps - 1)
    lastl = lastl[np.argsort(ldf["layer"].to_numpy()[lastl], kind="stable")]

    def last_step(name: str) -> list[Any]:
        return ldf[name].to_numpy()[lastl].tolist()

    assignments = int(ldf["assignments"].sum())
    tokens = prep.cluster.num_devices * sc.tokens_per_device
    return {
        "scenario": sc.name,
        "mode": mode,
        "hardware": prep.hw.name,
        "model": prep.shape.name,
        "devices": prep.cluster.num_devices,
        "nodes": sc.cluster.nodes,
        "devices_per_node": sc.cluster.devices_per_node,
        "tokens_per_device": sc.tokens_per_device,
        "capacity_factor": sc.capacity.factor,
        "overflow": sc.capacity.overflow,
        "slot_capacity": None if pd.isna(cap0 := ldf["slot_capacity"].iloc[0]) else int(cap0),
        "step_time_us": step_time,
        "step_times_us": step_times,
        "critical_device": critical,
        "breakdown_us": breakdown,
        "tokens_per_s": _processed_tokens_per_s(tokens, ldf, step_time),
        "layers": [int(x) for x in last_step("layer")],
        "expert_balance": [round(float(x), 6) for x in last_step("expert_balance")],
        "routed_balance": [round(float(x), 6) for x in last_step("routed_balance")],
        "processed_balance": [round(float(x), 6) for x in last_step("processed_balance")],
        "dropless_capacity_factor": [
            round(float(x), 6) for x in last_step("dropless_capacity_factor")
        ],
        "straggler_device": [int(x) for x in last_step("straggler_device")],
        "straggler_cause": [str(x) for x in last_step("straggler_cause")],
        "straggler_phase": [str(x) for x in last_step("straggler_phase")],
        "straggler_penalty": [round(float(x), 6) for x in last_step("straggler_penalty")],
        "injected": sc.stragglers.model_dump(mode="json", exclude_defaults=True),
        "drop_rate": float(ldf["dropped"].sum() / assignments) if assignments else 0.0,
        "dropped": int(ldf["dropped"].sum()),
        "rerouted": int(ldf["rerouted"].sum()),
        "assignments": assignments,
        "cross_node_bytes": float(ldf["cross_node_bytes"].iloc[lastl].sum()),
        "events": int(sum(r.events for r in records)),
    } | _memory_summary(prep, mode, float(ldf["dropless_capacity_factor"].max()))


def _processed_tokens_per_s(tokens: int, ldf: pd.DataFrame, step_time_us: float) -> float:
    """Throughput counting processed assignments only: ``tokens × (processed assignments /
    all assignments) / step time``, the assignments summed over every layer and step (a
    dropless run processes them all)."""
    if step_time_us <= 0:
        return 0.0
    assignments = int(ldf["assignments"].sum())
    processed = assignments - int(ldf["dropped"].sum())
    share = processed / assignments if assignments else 1.0
    return tokens * share / (step_time_us * 1e-6)


def _memory_summary(prep: Prepared, mode: str, dropless_factor: float) -> dict[str, Any]:
    """Bytes per device (see :mod:`moesim.costs.memory` for what is counted) and HBM size;
    and the bytes per device a padded kernel would hold at ``dropless_factor``, the smallest
    capacity factor that drops nothing (worst layer), so a dropless run shows the trade-off."""
    sc = prep.scenario

    def at(factor: float | None) -> Any:
        return memory_per_device(
            prep.shape,
            num_devices=prep.cluster.num_devices,
            mode=mode,
            tokens_per_device=sc.tokens_per_device,
            sequence_length=sc.sequence_length,
            precision=sc.precision,
            capacity_factor=factor,
            hbm_bytes=prep.hw.memory.hbm_bytes,
            expert_slots=int(prep.placement.slots.shape[2]),
        )

    mem = at(sc.capacity.factor)
    return {
        "memory_per_device_bytes": mem.total_bytes,
        "hbm_bytes": mem.hbm_bytes,
        "memory_fits": mem.fits,
        "memory_breakdown_bytes": mem.as_dict(),
        "padded_capacity_factor": round(dropless_factor, 6),
        "padded_memory_per_device_bytes": at(dropless_factor).total_bytes,
    }


def _union_us(start: np.ndarray, end: np.ndarray) -> float:
    """Total length of the union of intervals [start, end)."""
    keep = end > start
    order = np.argsort(start[keep], kind="stable")
    total, cur_s, cur_e = 0.0, None, None
    for s_, e_ in zip(start[keep][order], end[keep][order], strict=True):
        if cur_e is None or s_ > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = float(s_), float(e_)
        else:
            cur_e = max(cur_e, float(e_))
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total
