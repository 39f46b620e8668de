"""Placement files (YAML): per layer, per device, the logical experts the device hosts.

Format::

    num_experts: 8
    nodes: 1                 # optional: checked against the cluster when given
    devices_per_node: 2      # optional
    layers:
      - layer: 0             # model layer (or trace layer) index, informative
        devices:             # device i hosts these experts (replicas allowed)
          - [0, 1, 2, 3, 4]
          - [5, 6, 7, 0, 1]
      - layer: 1
        devices: {0: [0, 2, 4, 6, 1], 1: [1, 3, 5, 7, 0]}   # or by device id

Every device of every layer must have the same number of slots, every expert must have a
home in every layer, ids must be in range, and the slots must fit device memory. An expert
twice on one device is refused (a second copy there serves no other device), unless the
file says ``same_device_copies: true``: DeepSeek EPLB's plans (``eplb-global``,
``eplb-hierarchical``) can hold such copies, and moesim writes that line with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.fileio import atomic_write_text
from moesim.placement.base import Placement
from moesim.traces.store import MAX_EXPERTS
from moesim.yamlio import load_yaml

__all__ = ["placement_dict", "read_placement", "write_placement"]

_FLAGS = ("same_device_copies",)


def placement_dict(
    placement: Placement,
    layers: list[int] | None = None,
    *,
    nodes: int | None = None,
    devices_per_node: int | None = None,
) -> dict[str, Any]:
    """The file's content as plain data (also the ``--json`` layout of ``moesim place``)."""
    names = list(range(placement.num_layers)) if layers is None else list(layers)
    out: dict[str, Any] = {"num_experts": placement.num_experts}
    if nodes is not None and devices_per_node is not None:
        out |= {"nodes": nodes, "devices_per_node": devices_per_node}
    if _same_device_copy(placement.slots) is not None:
        out["same_device_copies"] = True
    out["layers"] = [
        {"layer": int(name), "devices": placement.slots[li].tolist()}
        for li, name in enumerate(names)
    ]
    return out


def write_placement(
    path: str | Path,
    placement: Placement,
    layers: list[int] | None = None,
    *,
    nodes: int | None = None,
    devices_per_node: int | None = None,
) -> Path:
    """Write ``placement`` as YAML (atomically); one flow-style list per device."""
    data = placement_dict(placement, layers, nodes=nodes, devices_per_node=devices_per_node)
    lines = [f"num_experts: {data['num_experts']}"]
    if "nodes" in data:
        lines += [f"nodes: {data['nodes']}", f"devices_per_node: {data['devices_per_node']}"]
    if data.get("same_device_copies"):
        lines.append("same_device_copies: true  # an expert twice on one device, as EPLB plans")
    lines.append("layers:")
    for entry in data["layers"]:
        lines.append(f"  - layer: {entry['layer']}")
        lines.append("    devices:")
        lines += [f"      - [{', '.join(str(x) for x in dev)}]" for dev in entry["devices"]]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _same_device_copy(slots: np.ndarray) -> tuple[int, int, int] | None:
    """(layer, device, expert) of the first expert held twice by one device of the
    (L, D, S) ``slots``, or None."""
    s = np.sort(slots, axis=2)
    twice = s[:, :, 1:] == s[:, :, :-1]
    if not twice.any():
        return None
    li, di, si = (int(x) for x in np.argwhere(twice)[0])
    return li, di, int(s[li, di, si])


def _int(value: Any, path: Path, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError("expected an integer", file=path, field=field, value=value)
    return value


def read_placement(
    path: str | Path,
    *,
    num_experts: int | None = None,
    num_layers: int | None = None,
    num_devices: int | None = None,
    max_slots_per_device: int | None = None,
    devices_per_node: int | None = None,
) -> tuple[Placement, list[int]]:
    """Read and validate a placement file; returns it and each entry's layer index.

    The keyword arguments are what the cluster and model require; a file that disagrees
    (an expert or device out of range, another number of layers, another node layout,
    more slots than fit in device memory) is an :class:`InputError` naming the file, field
    and value.
    """
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level", file=path)
    unknown = set(data) - {"num_experts", "nodes", "devices_per_node", "layers", *_FLAGS}
    if unknown:
        raise InputError("unknown field", file=path, field=str(sorted(map(str, unknown))[0]))
    copies = data.get("same_device_copies", False)
    if not isinstance(copies, bool):
        raise InputError(
            "expected true or false", file=path, field="same_device_copies", value=copies
        )
    e = _int(data.get("num_experts", num_experts), path, "num_experts")
    if num_experts is not None and e != num_experts:
        raise InputError(
            f"the model has {num_experts} experts", file=path, field="num_experts", value=e
        )
    if not 1 <= e <= MAX_EXPERTS:
        raise InputError(f"expected 1..{MAX_EXPERTS}", file=path, field="num_experts", value=e)
    if "nodes" in data or "devices_per_node" in data:
        nd = _int(data.get("nodes"), path, "nodes") * _int(
            data.get("devices_per_node"), path, "devices_per_node"
        )
        if num_devices is not None and nd != num_devices:
            raise InputError(
                f"the cluster has {num_devices} devices", file=path, field="nodes", value=nd
            )
        g = data["devices_per_node"]
        if devices_per_node is not None and g != devices_per_node:
            raise InputError(
                f"the cluster has {devices_per_node} devices per node",
                file=path,
                field="devices_per_node",
                value=g,
            )
        num_devices = nd if num_devices is None else num_devices
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InputError("expected a non-empty list of layers", file=path, field="layers")
    if num_layers is not None and len(layers) != num_layers:
        raise InputError(
            f"the model has {num_layers} MoE layers", file=path, field="layers", value=len(layers)
        )
    names: list[int] = []
    per_layer: list[list[list[int]]] = []
    for li, entry in enumerate(layers):
        where = f"layers[{li}]"
        if not isinstance(entry, dict) or "devices" not in entry:
            raise InputError("expected {layer, devices}", file=path, field=where)
        names.append(_int(entry.get("layer", li), path, f"{where}.layer"))
        devs = entry["devices"]
        if isinstance(devs, dict):
            ids = [_int(k, path, f"{where}.devices") for k in devs]
            n = num_devices if num_devices is not None else len(ids)
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise InputError(
                    f"device out of range 0..{n - 1}",
                    file=path,
                    field=f"{where}.devices",
                    value=bad[0],
                )
            if sorted(ids) != list(range(n)):
                missing = sorted(set(range(n)) - set(ids))[0]
                raise InputError(
                    "device has no slots", file=path, field=f"{where}.devices", value=missing
                )
            devs = [devs[i] for i in range(n)]
        if not isinstance(devs, list) or not devs:
            raise InputError("expected a list of devices", file=path, field=f"{where}.devices")
        if num_devices is not None and len(devs) > num_devices:
            raise InputError(
                f"device out of range 0..{num_devices - 1}",
                file=path,
                field=f"{where}.devices",
                value=num_devices,
            )
        if num_devices is not None and len(devs) < num_devices:
            raise InputError(
                f"{len(devs)} devices listed, the cluster has {num_devices}",
                file=path,
                field=f"{where}.devices",
                value=len(devs),
            )
        rows = []
        for di, dev in enumerate(devs):
            f = f"{where}.devices[{di}]"
            if not isinstance(dev, list) or not dev:
                raise InputError("expected a non-empty list of experts", file=path, field=f)
            ids = [_int(x, path, f) for x in dev]
            bad = [x for x in ids if not 0 <= x < e]
            if bad:
                raise InputError(
                    f"expert out of range 0..{e - 1}", file=path, field=f, value=bad[0]
                )
            rows.append(ids)
        per_layer.append(rows)
    sizes = {(li, di): len(r) for li, rows in enumerate(per_layer) for di, r in enumerate(rows)}
    s = sizes[(0, 0)]
    for (li, di), n in sizes.items():
        if n != s:
            raise InputError(
                f"unequal slot counts: device 0 of layer 0 has {s}, this device {n}",
                file=path,
                field=f"layers[{li}].devices[{di}]",
                value=n,
            )
    if len({len(rows) for rows in per_layer}) != 1:
        li = next(i for i, r in enumerate(per_layer) if len(r) != len(per_layer[0]))
        raise InputError(
            "layers list different numbers of devices",
            file=path,
            field=f"layers[{li}].devices",
            value=len(per_layer[li]),
        )
    if max_slots_per_device is not None and s > max_slots_per_device:
        raise InputError(
            f"{s} expert slots per device exceed device memory ({max_slots_per_device} fit)",
            file=path,
            field="layers[0].devices[0]",
            value=s,
        )
    slots = np.array(per_layer, dtype=np.int32)  # (L, D, S)
    twice = None if copies else _same_device_copy(slots)
    if twice is not None:
        li, di, ex = twice
        raise InputError(
            f"expert {ex} twice on device {di} (a second copy there serves no other device; "
            "'same_device_copies: true' allows it)",
            file=path,
            field=f"layers[{li}].devices[{di}]",
            value=ex,
        )
    for li in range(slots.shape[0]):
        count = np.bincount(slots[li].ravel(), minlength=e)
        if (count == 0).any():
            raise InputError(
                "expert has no home (hosted by no device)",
                file=path,
                field=f"layers[{li}]",
                value=int(np.flatnonzero(count == 0)[0]),
            )
    return Placement(slots=slots, num_experts=e), names
