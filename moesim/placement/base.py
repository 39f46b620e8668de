"""The placement data type and the contiguous planner (Megatron's default)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError

__all__ = ["Placement", "contiguous"]


@dataclass(frozen=True)
class Placement:
    """Experts hosted by each device, per MoE layer.

    Attributes:
        slots: (L, D, S) int32, ``slots[l, d]`` are the logical experts device ``d`` hosts
            in MoE layer ``l``; an expert may appear on several devices (replicas).
        num_experts: logical experts per layer (E).
    """

    slots: np.ndarray
    num_experts: int

    @property
    def num_layers(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_devices(self) -> int:
        return int(self.slots.shape[1])

    def replicas(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Devices hosting each expert of ``layer``.

        Returns:
            table: (E, R) int32, hosting devices of each expert padded with -1, ascending.
            count: (E,) int32, number of replicas of each expert.
        """
        s = self.slots[layer]  # (D, S)
        dev = np.repeat(np.arange(s.shape[0], dtype=np.int32), s.shape[1])
        exp = s.reshape(-1)
        count = np.bincount(exp, minlength=self.num_experts).astype(np.int32)
        if (count == 0).any():
            homeless = int(np.flatnonzero(count == 0)[0])
            raise InputError(
                f"expert {homeless} of layer {layer} is hosted by no device",
                field="placement",
                value=homeless,
            )
        order = np.lexsort((dev, exp))
        exp_s, dev_s = exp[order], dev[order]
        start = np.concatenate(([0], np.cumsum(count)[:-1]))
        col = np.arange(exp_s.size) - start[exp_s]
        table = np.full((self.num_experts, int(count.max())), -1, dtype=np.int32)
        table[exp_s, col] = dev_s
        return table, count


def contiguous(num_experts: int, num_devices: int, num_layers: int) -> Placement:
    """Experts in id order, in equal contiguous blocks (Megatron's expert-parallel default).

    With more devices than experts, each expert is replicated on ``D / E`` consecutive
    devices. Returns slots of shape (L, D, max(E // D, 1)).
    """
    e, d = num_experts, num_devices
    if e % d == 0:
        per_dev = np.arange(e, dtype=np.int32).reshape(d, e // d)
    elif d % e == 0:
        per_dev = (np.arange(d, dtype=np.int32) // (d // e)).reshape(d, 1)
    else:
        raise InputError(
            f"contiguous placement needs experts ({e}) to be a multiple of devices ({d}) "
            "or devices a multiple of experts",
            field="placement",
            value="contiguous",
        )
    return Placement(
        slots=np.broadcast_to(per_dev, (num_layers, *per_dev.shape)).copy(), num_experts=e
    )
