"""Simulator-in-the-loop refinement: local search on a placement, judged by a callback
(normally the simulated step time of a scenario).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moesim.errors import InputError
from moesim.placement.base import Placement

if TYPE_CHECKING:
    from moesim.sim.prepare import Prepared

__all__ = ["Refined", "refine", "refine_for_scenario", "step_time_fn"]


def refine(
    placement: Placement,
    evaluate: Callable[[Placement], float],
    *,
    iterations: int = 50,
    seed: int = 0,
) -> tuple[Placement, float, int]:
    """Improve ``placement`` by swapping slots while ``evaluate`` (lower is better) improves.

    Each iteration picks a layer, a slot of one device and a slot of another device
    (seeded), swaps their experts when neither device then hosts an expert twice, and
    keeps the swap only if ``evaluate`` drops. Every kept placement is a valid one (same
    slots per device, every expert homed).

    Returns:
        the best placement, its value, and the number of swaps kept.
    """
    rng = np.random.default_rng([seed, 0x5EF1])
    best = placement
    best_val = float(evaluate(placement))
    num_layers, d, s = placement.slots.shape
    kept = 0
    if d < 2:
        return best, best_val, kept
    for _ in range(iterations):
        li = int(rng.integers(num_layers))
        a, b = rng.choice(d, size=2, replace=False)
        i, j = rng.integers(s, size=2)
        slots = best.slots.copy()
        ea, eb = slots[li, a, i], slots[li, b, j]
        if ea == eb or eb in slots[li, a] or ea in slots[li, b]:
            continue
        slots[li, a, i], slots[li, b, j] = eb, ea
        trial = Placement(slots=slots, num_experts=best.num_experts)
        val = float(evaluate(trial))
        if val < best_val:
            best, best_val, kept = trial, val, kept + 1
    return best, best_val, kept


def step_time_fn(prep: Prepared, mode: str = "prefill") -> Callable[[Placement], float]:
    """``evaluate`` for :func:`refine`: the simulated step time (us) of ``prep``'s scenario
    with the placement swapped in."""
    from moesim.sim.simulate import simulate_mode

    def evaluate(p: Placement) -> float:
        return float(simulate_mode(replace(prep, placement=p), mode).summary["step_time_us"])

    return evaluate


@dataclass(frozen=True)
class Refined:
    """What :func:`refine_for_scenario` found."""

    placement: Placement
    mode: str
    step_time_us_before: float
    step_time_us_after: float
    swaps_tried: int
    swaps_kept: int


def refine_for_scenario(
    placement: Placement, scenario_path: Path, *, iterations: int = 50, seed: int = 0
) -> Refined:
    """Refine ``placement`` on the simulated step time of a scenario file's first mode, the
    scenario's own placement replaced by ``placement``.

    The placement must match the scenario: its MoE layers, devices and experts, and no more
    slots per device than fit the scenario's device memory; otherwise an
    :class:`InputError` names the scenario file.
    """
    from moesim.placement.memory import max_expert_slots
    from moesim.scenario import load_scenario
    from moesim.sim.prepare import prepare

    scenario, base = load_scenario(scenario_path)
    prep = prepare(scenario, base, scenario_path)
    have = (placement.num_layers, placement.num_devices, placement.num_experts)
    want = (prep.placement.num_layers, prep.placement.num_devices, prep.shape.num_experts)
    for name, h, w in zip(("MoE layers", "devices", "experts"), have, want, strict=True):
        if h != w:
            raise InputError(
                f"the plan has {h} {name}, the scenario {w}",
                file=scenario_path,
                field="placement",
                value=h,
            )
    fit = max_expert_slots(prep.shape, prep.hw, scenario.precision)
    if placement.slots.shape[2] > fit:
        raise InputError(
            f"the plan's {placement.slots.shape[2]} slots per device exceed the {fit} that "
            "fit in the scenario's device memory",
            file=scenario_path,
            field="placement",
            value=int(placement.slots.shape[2]),
        )
    mode = scenario.modes[0]
    evaluate = step_time_fn(prep, mode)
    before = evaluate(placement)
    best, after, kept = refine(placement, evaluate, iterations=iterations, seed=seed)
    return Refined(best, mode, before, after, iterations, kept)
