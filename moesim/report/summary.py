"""Plain-text and Markdown summaries of a simulation."""

from __future__ import annotations

from typing import Any

from moesim.sim.simulate import SimResult

__all__ = [
    "PARTS",
    "console_summary",
    "dispatcher_text",
    "fmt_bytes",
    "fmt_us",
    "header_line",
    "injected_faults",
    "layer_table",
    "memory_line",
    "memory_warnings",
    "report_warnings",
    "tokens_per_device_text",
]

PARTS = (
    ("expert compute", "expert_us"),
    ("dispatch", "dispatch_us"),
    ("combine", "combine_us"),
    ("gradient all-reduce", "allreduce_us"),
    ("other", "other_us"),
    ("waiting", "wait_us"),
)


def fmt_us(us: float) -> str:
    """A duration with a readable unit (rounding noise below 0.05 µs shows as 0.0 µs)."""
    if abs(us) < 0.05:
        us = 0.0
    if us >= 1e6:
        return f"{us / 1e6:.3f} s"
    if us >= 1e3:
        return f"{us / 1e3:.3f} ms"
    return f"{us:.1f} µs"


def _breakdown(s: dict[str, Any]) -> str:
    total = s["step_time_us"] or 1.0
    parts = [(n, k) for n, k in PARTS if k != "allreduce_us" or s["mode"] == "training"]
    if s["breakdown_us"].get("overlapped_us", 0.0) > 0:
        parts.append(("overlapped (counted twice above)", "overlapped_us"))
    return ", ".join(
        f"{name} {fmt_us(s['breakdown_us'][k])} ({100 * s['breakdown_us'][k] / total:.1f}%)"
        for name, k in parts
    )


def injected_faults(result: SimResult) -> str:
    """The slowness a scenario injects, e.g. ``device 3 compute x1.5; device 5 NIC at
    0.5x bandwidth``; empty when none."""
    st = result.scenario.stragglers
    parts = [f"device {d} compute x{f:g}" for d, f in sorted(st.slow_devices.items())]
    if st.jitter:
        parts.append(f"compute jitter {st.jitter:g} (log-normal spread)")
    parts += [f"device {d} NIC at {f:g}x bandwidth" for d, f in sorted(st.degraded_nics.items())]
    return "; ".join(parts)


def tokens_per_device_text(tokens_per_device: int, modes: list[str]) -> str:
    """What ``tokens_per_device`` means in these modes: tokens each device feeds into a
    layer; in decode, sequences per device, each adding one new token per step."""
    text = f"{tokens_per_device:,} tokens/device"
    if "decode" in modes:
        text += f" (decode: {tokens_per_device:,} sequences/device, one new token each)"
    return text


def fmt_bytes(n: float, digits: int = 2) -> str:
    """Bytes with a decimal unit (GB = 10^9 bytes), ``digits`` after the point."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


def memory_line(s: dict[str, Any]) -> str:
    """One mode's memory per device against HBM, by component, and whether it fits."""
    b = s["memory_breakdown_bytes"]
    parts = [
        ("dense weights", b["dense_weights_bytes"]),
        ("expert slots", b["expert_weights_bytes"]),
        ("gradients + optimizer", b["optimizer_bytes"]),
        ("activations", b["activation_bytes"]),
        ("KV cache", b["kv_cache_bytes"]),
    ]
    shown = ", ".join(
        f"{n} {fmt_bytes(v, 1)}" for n, v in parts if v or n != "gradients + optimizer"
    )
    verdict = "fits" if s["memory_fits"] else "does NOT fit"
    return (
        f"memory per device {fmt_bytes(s['memory_per_device_bytes'], 1)} of "
        f"{fmt_bytes(s['hbm_bytes'], 1)} HBM: {verdict} ({shown})"
    )


def memory_warnings(summaries: list[dict[str, Any]]) -> list[str]:
    """One warning per mode whose memory per device exceeds the device's HBM."""
    return [
        f"WARNING: {s['mode']} does not fit in HBM: "
        f"{fmt_bytes(s['memory_per_device_bytes'], 1)} per device, "
        f"{fmt_bytes(s['hbm_bytes'], 1)} HBM"
        for s in summaries
        if "memory_fits" in s and not s["memory_fits"]
    ]


def report_warnings(summaries: list[dict[str, Any]], injected: str) -> list[str]:
    """What a report says before anything else, when it applies: modes that do not fit in
    HBM, modes that drop assignments, and the slowness the scenario injects."""
    drops = [
        f"WARNING: {s['mode']} drops {100 * s['drop_rate']:.3f}% of assignments "
        f"({s['dropped']:,} of {s['assignments']:,}) at capacity factor "
        f"{s['capacity_factor']}, where serving and dropless training drop none "
        "(capacity.factor: null)"
        for s in summaries
        if s.get("dropped")
    ]
    faults = [f"INJECTED: {injected}; step times include this slowness"] if injected else []
    return [*memory_warnings(summaries), *drops, *faults]


#: what each de-duplication sends, in words
_COPIES = {
    "none": "a copy per (token, expert)",
    "device": "one copy per destination device",
    "node": "one copy per destination node",
}


def dispatcher_text(name: str, dedup: str) -> str:
    """The dispatcher a run assumed, e.g. ``deepep-normal dispatcher, one copy per
    destination node``."""
    return f"{name} dispatcher, {_COPIES.get(dedup, dedup)}"


def header_line(result: SimResult) -> str:
    sc = result.scenario
    cf = sc.capacity.factor
    faults = injected_faults(result)
    capacity = (
        "dropless (unlimited capacity)"
        if cf is None
        else f"capacity factor {cf} ({sc.capacity.overflow})"
    )
    redundant = f" + {sc.redundant_slots} redundant slots" if sc.redundant_slots else ""
    gran = result.runs[0].summary.get("granularity") if result.runs else None
    network = f"; flow network, {gran} flows" if gran else "; analytic network"
    if sc.routing.layer_map is not None:
        network += f"; trace layers mapped: {sc.routing.layer_map}"
    if "dispatcher" in result.inputs:
        network += f"; {dispatcher_text(result.inputs['dispatcher'], result.inputs['dedup'])}"
    if result.inputs.get("routing_level"):  # synthetic routing: its level, and why
        network += f"; {result.inputs['routing_level']}"
    return (
        f"{result.shape.name} on {sc.cluster.nodes} node(s) x {sc.cluster.devices_per_node} "
        f"{result.hw.name} ({sc.cluster.num_devices} devices), {sc.placement} placement"
        f"{redundant}, {tokens_per_device_text(sc.tokens_per_device, list(sc.modes))}, "
        f"{capacity}{network}" + (f"; injected: {faults}" if faults else "")
    )


#: the console's name of each straggler phase (a metrics category)
PHASE_NAMES = {"expert": "experts", "dispatch": "dispatch", "combine": "combine", "other": "other"}


def layer_table(s: dict[str, Any]) -> list[str]:
    """Per MoE layer of one mode's summary: balance (max / mean) of expert and device load
    before capacity and of device load after drops, the capacity factor that drops
    nothing, and the straggler on the critical path with its cause and penalty."""
    lines = [
        "MoE layer  expert balance  routed balance  processed balance  dropless cf"
        "  straggler  cause             penalty (phase)"
    ]
    for i, layer in enumerate(s["layers"]):
        phase = PHASE_NAMES.get(s["straggler_phase"][i], s["straggler_phase"][i])
        lines.append(
            f"{layer:>9}  {s['expert_balance'][i]:14.3f}  {s['routed_balance'][i]:14.3f}  "
            f"{s['processed_balance'][i]:17.3f}  {s['dropless_capacity_factor'][i]:11.3f}  "
            f"{'device ' + str(s['straggler_device'][i]):>9}  "
            f"{s['straggler_cause'][i]:<16}  {100 * s['straggler_penalty'][i]:6.1f}% ({phase})"
        )
    return lines


def console_summary(result: SimResult) -> str:
    """The short summary printed after a run: per mode the step time and its breakdown,
    then per MoE layer the balance before and after capacity and the straggler (routing is
    the same in every mode; the straggler is that of the first mode)."""
    lines = [header_line(result)]
    for run in result.runs:
        s = run.summary
        lines.append("")
        lines.append(
            f"[{s['mode']}] step time {fmt_us(s['step_time_us'])}  "
            f"({s['tokens_per_s']:,.0f} tokens/s)"
        )
        lines.append(
            f"  breakdown on device {s['critical_device']} (finishes last): {_breakdown(s)}"
        )
        if s["capacity_factor"] is None:
            lines.append(
                f"  dropless: all {s['assignments']:,} assignments processed; a padded kernel "
                f"would need capacity factor {s['padded_capacity_factor']:.2f} to drop nothing "
                f"({fmt_bytes(s['padded_memory_per_device_bytes'], 1)} per device)"
            )
        else:
            lines.append(
                f"  drop rate {100 * s['drop_rate']:.3f}% ({s['dropped']:,} of "
                f"{s['assignments']:,} assignments; capacity {s['slot_capacity']} per "
                "slot; tokens/s count processed assignments only)"
            )
        if "memory_fits" in s:
            lines.append(f"  {memory_line(s)}")
    s = result.runs[0].summary
    lines += ["", f"MoE layers ({s['mode']}, forward pass, last step):", *layer_table(s)]
    warnings = memory_warnings([r.summary for r in result.runs])
    if warnings:
        lines += ["", *warnings]
    return "\n".join(lines)
