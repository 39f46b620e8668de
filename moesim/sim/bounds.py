"""What a scenario will cost, estimated before anything is allocated.

:func:`check_bounds` refuses, in one line naming the field, a scenario whose main
allocations would not fit in this machine's memory, or whose engine work would take longer
than anyone waits. The estimates are lower bounds of the largest terms, so a refusal is
never wrong by much; a scenario that passes may still need more.

================  ==========================================================================
term              bytes
================  ==========================================================================
routing           token-level synthetic routing, held whole: 8 bytes per assignment (an
                  int32 id and a float32 weight), layers x tokens x top-k; a trace is read
                  one layer at a time and only the ids of the tokens the steps replay,
                  min(trace tokens, devices x tokens_per_device x steps), are kept, in
                  1 byte per assignment up to 256 experts (2 up to 65,536, else 4)
traffic           the (D, D) matrices one layer's routing builds at once: 6 x 8 x D^2
engine            the engine's per-op arrays: 10 x 8 bytes x ops x D
================  ==========================================================================

Work: ops x devices x steps op-device updates; more than :data:`MAX_OP_DEVICE_STEPS`
(about a day at the engine's few million per second) is refused.
"""

from __future__ import annotations

import os

import numpy as np

from moesim.errors import InputError
from moesim.model.shapes import ModelShape
from moesim.scenario import Scenario
from moesim.traces.store import id_dtype

__all__ = ["MAX_OP_DEVICE_STEPS", "check_bounds", "machine_memory_bytes", "scenario_bytes"]

#: op-device updates of one simulation above which it is refused (a day at ~3e6 per second)
MAX_OP_DEVICE_STEPS = 3e11
_OPS_PER_LAYER = 16  # forward and backward ops of one MoE layer, an upper estimate


def _ops(sc: Scenario, shape: ModelShape) -> int:
    """Ops of one step's program, an upper estimate."""
    return _OPS_PER_LAYER * shape.num_layers * (2 if sc.overlap else 1)


def machine_memory_bytes() -> int:
    """Physical memory of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def scenario_bytes(
    sc: Scenario, shape: ModelShape, trace_tokens: int | None, count_level: bool | None = None
) -> dict[str, float]:
    """The largest allocations of a run of ``sc`` (see the module docstring), by term;
    ``trace_tokens``: tokens of the scenario's trace (None: synthetic routing);
    ``count_level``: whether synthetic routing runs at count level (None: as the scenario
    writes it, ``auto`` counted as token level, the larger)."""
    d = sc.cluster.num_devices
    layers = len(shape.moe_layer_indices())
    syn = sc.routing.synthetic
    replayed = d * sc.tokens_per_device * sc.steps
    per_assignment = 8  # an int32 id and a float32 weight
    if trace_tokens is not None:  # only the replayed tokens' ids are kept
        tokens = min(trace_tokens, replayed)
        per_assignment = np.dtype(id_dtype(shape.num_experts)).itemsize
    elif syn is not None and not (syn.level == "count" if count_level is None else count_level):
        tokens = replayed
    else:
        tokens = 0
    ops = _ops(sc, shape)
    return {
        "routing": float(per_assignment * layers * tokens * shape.top_k),
        "traffic": 6 * 8.0 * d * d,
        "engine": 10 * 8.0 * ops * d,
    }


def check_bounds(
    sc: Scenario,
    shape: ModelShape,
    source: object,
    trace_tokens: int | None = None,
    count_level: bool | None = None,
) -> None:
    """Raise :class:`InputError` naming the field to change when ``sc`` cannot run here
    (``trace_tokens``, ``count_level``: see :func:`scenario_bytes`)."""
    terms = scenario_bytes(sc, shape, trace_tokens, count_level)
    have = machine_memory_bytes()
    need = sum(terms.values())
    if need > 0.8 * have:
        worst = max(terms, key=lambda k: terms[k])
        value: int | str
        field, value = {
            "routing": ("tokens_per_device", sc.tokens_per_device),
            "traffic": ("cluster.nodes", sc.cluster.nodes),
            "engine": ("cluster.nodes", sc.cluster.nodes),
        }[worst]
        if worst == "routing" and trace_tokens is not None:
            field, value = "routing.trace", str(sc.routing.trace)
        elif worst == "routing" and sc.steps > 1:
            field, value = "steps", sc.steps
        raise InputError(
            f"needs about {need / 1e9:,.1f} GB ({worst} {terms[worst] / 1e9:,.1f} GB), more "
            f"than this machine's {have / 1e9:,.1f} GB allows",
            file=str(source),
            field=field,
            value=value,
        )
    work = float(_ops(sc, shape)) * sc.cluster.num_devices * sc.steps * len(sc.modes)
    if work > MAX_OP_DEVICE_STEPS:
        raise InputError(
            f"about {work:.1e} op-device updates, more than {MAX_OP_DEVICE_STEPS:.0e} "
            "(a day of the engine): fewer steps or devices",
            file=str(source),
            field="steps" if sc.steps > 1 else "cluster.nodes",
            value=sc.steps if sc.steps > 1 else sc.cluster.nodes,
        )
