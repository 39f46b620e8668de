"""Plain-text and Markdown summaries of a simulation."""

from __future__ import annotations

from typing import Any

from moesim.sim.simulate import SimResult

__all__ = ["PARTS", "console_summary", "fmt_us", "header_line"]

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


def header_line(result: SimResult) -> str:
    sc = result.scenario
    cf = sc.capacity.factor
    return (
        f"{result.shape.name} on {sc.cluster.nodes} node(s) x {sc.cluster.devices_per_node} "
        f"{result.hw.name} ({sc.cluster.num_devices} devices), {sc.placement} placement, "
        f"{sc.tokens_per_device} tokens/device, capacity factor "
        f"{'unlimited' if cf is None else cf} ({sc.capacity.overflow})"
    )


def console_summary(result: SimResult) -> str:
    """The short summary printed after a run: per mode the step time and its breakdown,
    then per MoE layer the balance ratio and straggler (routing is the same in every mode;
    the penalty is that of the first mode)."""
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
        lines.append(
            f"  drop rate {100 * s['drop_rate']:.3f}% ({s['dropped']:,} of "
            f"{s['assignments']:,} assignments; capacity {s['expert_capacity']} per expert)"
        )
    s = result.runs[0].summary
    lines += ["", "MoE layer  balance ratio  straggler  penalty"]
    for layer, br, dev, pen in zip(
        s["layers"], s["balance_ratio"], s["straggler_device"], s["straggler_penalty"], strict=True
    ):
        lines.append(f"{layer:>9}  {br:13.3f}  {'device ' + str(dev):>9}  {100 * pen:6.1f}%")
    return "\n".join(lines)
