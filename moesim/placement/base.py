"""The placement data type and the contiguous planner (Megatron's default)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from moesim.errors import InputError

__all__ = ["Placement", "contiguous", "sequence_deal"]


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
        s = np.ascontiguousarray(self.slots[layer], dtype=np.int32)  # (D, S)
        table, count = _replicas(s.tobytes(), s.shape, self.num_experts)
        if table is None:
            homeless = int(np.flatnonzero(count == 0)[0])
            raise InputError(
                f"expert {homeless} of layer {layer} is hosted by no device",
                field="placement",
                value=homeless,
            )
        return table, count


@lru_cache(maxsize=128)
def _replicas(
    slots_bytes: bytes, shape: tuple[int, int], num_experts: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """:meth:`Placement.replicas` of one layer's (D, S) slots (table None when an expert
    is hosted nowhere), kept per process by content as read-only arrays: the layers of a
    placement, and a sweep's cases, often share their slots."""
    s = np.frombuffer(slots_bytes, dtype=np.int32).reshape(shape)
    dev = np.repeat(np.arange(s.shape[0], dtype=np.int32), s.shape[1])
    exp = s.reshape(-1)
    count = np.bincount(exp, minlength=num_experts).astype(np.int32)
    count.setflags(write=False)
    if (count == 0).any():
        return None, count
    order = np.lexsort((dev, exp))
    exp_s, dev_s = exp[order], dev[order]
    start = np.concatenate(([0], np.cumsum(count)[:-1]))
    col = np.arange(exp_s.size) - start[exp_s]
    table = np.full((num_experts, int(count.max())), -1, dtype=np.int32)
    table[exp_s, col] = dev_s
    table.setflags(write=False)
    return table, count


def sequence_deal(seq: np.ndarray, num_devices: int, per_dev: int, start: np.ndarray) -> np.ndarray:
    """Deal experts ``seq`` (N,) in order: item i goes to the first device from ``start[i]``
    on (cyclically) with a free slot that does not host it yet (else any with a free slot).

    Returns (D, S) int32. Load-unaware, so done once and shared by every layer.
    """
    slots: list[list[int]] = [[] for _ in range(num_devices)]
    for e, s in zip(seq.tolist(), start.tolist(), strict=True):
        first_free = None
        for j in range(num_devices):  # usually the start device itself: stop at the first fit
            d = (s + j) % num_devices
            if len(slots[d]) < per_dev:
                if e not in slots[d]:
                    break
                if first_free is None:
                    first_free = d
        else:
            assert first_free is not None  # N = D * S items: a slot is always free
            d = first_free
        slots[d].append(e)
    return np.array(slots, dtype=np.int32)


def contiguous(
    num_experts: int, num_devices: int, num_layers: int, redundant: int | None = None
) -> Placement:
    """Experts in id order, in equal contiguous blocks (Megatron's expert-parallel default):
    slot ``p`` of the sequence 0, 1, ..., E-1, 0, 1, ... on device ``p // S``, with
    ``S = (E + redundant) / D`` slots per device; a repeated expert skips a device that
    already hosts it.

    The redundant slots repeat experts 0, 1, ... (load-unaware). By default there are none,
    except with more devices than experts, where each group of ``E`` consecutive devices
    holds every expert once (expert-data parallelism: ``D - E`` redundant slots).

    Returns slots of shape (L, D, S).
    """
    e, d = num_experts, num_devices
    if redundant is None:
        if e % d and d % e:
            raise InputError(
                f"contiguous placement needs experts ({e}) to be a multiple of devices ({d}) "
                "or devices a multiple of experts",
                field="placement",
                value="contiguous",
            )
        redundant = 0 if e % d == 0 else d - e
    total = e + redundant
    if redundant < 0 or total % d:
        raise InputError(
            f"experts + redundant slots ({e} + {redundant}) must be a positive multiple of "
            f"the {d} devices",
            field="redundant",
            value=redundant,
        )
    s = total // d
    one = sequence_deal(np.arange(d * s) % e, d, s, np.arange(d * s) // s)
    return Placement(slots=np.broadcast_to(one, (num_layers, d, s)).copy(), num_experts=e)
