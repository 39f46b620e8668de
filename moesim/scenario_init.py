"""``moesim init``: write a commented scenario file that simulates as it is.

The file is built from a model preset (or model YAML), a hardware profile and a cluster
size, with routing from a trace folder or a synthetic distribution. Every value is checked
the way ``moesim simulate`` checks it (the scenario schema, the model and hardware names,
the trace's experts and top-k against the model) before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from moesim.errors import InputError
from moesim.hardware import get_profile
from moesim.model.shapes import ModelShape, get_preset, load_shape
from moesim.scenario import Mode, Scenario

__all__ = ["InitRequest", "scenario_text"]

R = TypeVar("R")


def _shape(value: str) -> ModelShape:
    """A model preset by name, or a model YAML file."""
    return load_shape(Path(value)) if value.endswith((".yaml", ".yml")) else get_preset(value)


#: tokens each device feeds a layer per step when neither a trace nor the user says
DEFAULT_TOKENS_PER_DEVICE = 4096
#: sequences per device in a decode-only scenario
DEFAULT_DECODE_SEQUENCES = 128
#: notes start in this column; a longer line has its note on the line above
_COMMENT_COLUMN = 40


@dataclass(frozen=True)
class InitRequest:
    """What ``moesim init`` was asked for; ``out`` is where the scenario will be written
    (relative paths in the file are written relative to its folder)."""

    out: Path
    model: str
    hardware: str
    nodes: int
    devices_per_node: int | None = None
    trace: Path | None = None
    synthetic: str | None = None
    modes: list[Mode] = field(default_factory=lambda: ["training"])
    tokens_per_device: int | None = None
    sequence_length: int = 4096
    placement: str = "contiguous"
    dispatcher: str = "auto"
    seed: int = 0


def _scalar(value: object) -> str:
    """One YAML scalar or flow collection, quoted where YAML needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _relative(path: Path, folder: Path) -> str:
    """``path`` as the scenario will name it: relative to the scenario's folder when the
    two share a folder below the root, else absolute."""
    path, folder = path.resolve(), folder.resolve()
    if Path(os.path.commonpath([path, folder])) == Path(path.anchor):
        return path.as_posix()  # nothing in common but the root
    return Path(os.path.relpath(path, folder)).as_posix()


def _reference(value: str, folder: Path, field: str, load: Callable[[str], R]) -> tuple[str, R]:
    """What a scenario's ``field`` (``model`` or ``hardware``) names: a bundled name, or a
    YAML file written relative to the scenario's folder; returns the value to write and
    what it loads (``load``: the name or file to what it names)."""
    if value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise InputError(f"{field} file not found", file=value, field=field, value=value)
        return _relative(Path(value), folder), load(value)
    loaded = load(value)
    return str(loaded.name), loaded  # type: ignore[attr-defined]


def scenario_text(req: InitRequest) -> str:
    """The scenario file's text, checked: it loads as a :class:`Scenario`, its model and
    hardware exist, and a trace's experts and top-k match the model."""
    from moesim.traces.store import open_trace

    if (req.trace is None) == (req.synthetic is None):
        raise InputError("give exactly one of --trace or --synthetic", field="routing")
    folder = req.out.absolute().parent
    model_value, shape = _reference(req.model, folder, "model", _shape)
    hardware_value, profile = _reference(req.hardware, folder, "hardware", get_profile)
    per_node = req.devices_per_node or profile.devices_per_node
    devices = req.nodes * per_node

    tokens = req.tokens_per_device
    if req.trace is not None:
        info = open_trace(req.trace)
        for name, have, want in (
            ("num_experts", info.num_experts, shape.num_experts),
            ("top_k", info.top_k, shape.top_k),
        ):
            if have != want:
                raise InputError(
                    f"the trace has {name} {have}, the model {model_value} has {want}",
                    file=req.trace,
                    field=name,
                    value=have,
                )
        moe = shape.num_moe_layers
        cycle = len(info.layers) != moe  # fewer (or more) trace layers than MoE layers
        routing = f"{{trace: {_scalar(_relative(req.trace, folder))}" + (
            ", layer_map: cycle}" if cycle else "}"
        )
        routing_note = (
            f"replayed from the trace ({info.num_tokens:,} tokens per layer, "
            f"{len(info.layers)} layers"
            + (f", cycled over the model's {moe} MoE layers)" if cycle else ")")
        )
        if tokens is None:  # each token of the trace replayed once per step
            tokens = max(1, info.num_tokens // devices)
    else:
        routing = f"{{synthetic: {{distribution: {_scalar(req.synthetic)}, seed: {req.seed}}}}}"
        routing_note = "drawn from a seeded distribution (uniform | zipf:S | dirichlet:A | ...)"
    if tokens is None:
        tokens = DEFAULT_DECODE_SEQUENCES if req.modes == ["decode"] else DEFAULT_TOKENS_PER_DEVICE
    mode = _scalar(req.modes[0] if len(req.modes) == 1 else list(req.modes))
    name = req.out.stem

    fields = [
        ("name", _scalar(name), ""),
        ("hardware", _scalar(hardware_value), "a profile name (moesim hardware list) or file"),
        ("cluster", f"{{nodes: {req.nodes}, devices_per_node: {per_node}}}", f"{devices} devices"),
        ("model", _scalar(model_value), "a preset (moesim models) or a model YAML file"),
        ("routing", routing, routing_note),
        ("placement", _scalar(req.placement), "a planner, or a placement YAML file"),
        ("redundant_slots", "0", "extra expert slots per layer, for replicas of hot experts"),
        ("capacity", "{factor: null}", "dropless (unlimited expert capacity), as serving runs"),
        ("mode", mode, "training | prefill | decode, or a list of them"),
        ("tokens_per_device", str(tokens), "per layer per step; decode: sequences per device"),
        ("sequence_length", str(req.sequence_length), "tokens per sequence"),
        ("precision", "bf16", "GEMMs: bf16 | fp8"),
        ("dispatcher", _scalar(req.dispatcher), "auto: deepep-normal on Hopper+, else nccl"),
        ("network", "{tier: analytic}", "analytic (port-limited) | flow (flows share links)"),
        ("steps", "1", ""),
        ("seed", str(req.seed), "every random choice of the scenario"),
    ]
    lines = [f"{key}: {value}" for key, value, _ in fields]
    width = min(max(len(line) for line in lines), _COMMENT_COLUMN) + 2
    body = "\n".join(
        line
        if not note
        else f"{line:<{width}}# {note}"
        if len(line) < width
        else f"# {note}\n{line}"
        for line, (_, _, note) in zip(lines, fields, strict=True)
    )
    text = (
        "# A moesim scenario, written by `moesim init`. Edit any value, then run\n"
        f"#   moesim simulate {_scalar(str(req.out))} --out reports/{name}\n"
        "# Fields: docs/scenarios-and-sweeps.md. Relative paths start from this file's folder.\n"
        f"{body}\n"
    )
    _check(text, req.out)
    return text


def _check(text: str, out: Path) -> None:
    """The written file must load as a scenario: any error here is ours to report as the
    option the user gave, so it names the scenario field."""
    from pydantic import ValidationError

    from moesim.yamlio import validation_to_input_error

    try:
        Scenario.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        raise validation_to_input_error(exc, out) from None
