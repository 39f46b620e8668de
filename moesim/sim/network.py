"""Analytic all-to-all time: each device limited by its own ports, per fabric tier.

Inside a scale-up domain (NVLink/NVSwitch, Infinity Fabric, ICI) bytes move at the
device's scale-up bandwidth; between domains at its scale-out (NIC) bandwidth. Both
tiers run at once, each direction independently, so a device's transfer time is::

    latency + max(send_up, recv_up) / bw_up  ∨  max(send_out, recv_out) / bw_out

where ``∨`` is max and latency is that of the slowest tier the device uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moesim.hardware import HardwareProfile

__all__ = ["A2ATimes", "a2a_times_us", "block_diagonal_sums", "domain_of", "port_times_us"]


def domain_of(num_devices: int, domain_size: int) -> np.ndarray:
    """(D,) scale-up domain index of each device (consecutive devices share a domain)."""
    return np.arange(num_devices) // domain_size


@dataclass(frozen=True)
class A2ATimes:
    """Per-device results of one all-to-all. All arrays are (D,).

    ``uses_up`` / ``uses_out``: the device sends or receives inside its scale-up domain /
    across domains (what decides which tier's latency it pays).
    """

    time_us: np.ndarray
    sent_bytes: np.ndarray
    recv_bytes: np.ndarray
    cross_domain_bytes: float
    uses_up: np.ndarray
    uses_out: np.ndarray


def block_diagonal_sums(m: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(D,) bytes each device sends to / receives from devices of its own block of
    ``block`` consecutive devices (a scale-up domain, a node), diagonal included.

    Only the diagonal blocks are read: O(D * block), not O(D^2).
    """
    d = m.shape[0]
    g = min(block, d)
    if d % g == 0:
        m4 = m.reshape(d // g, g, d // g, g)
        blocks = np.einsum("iaib->iab", m4)  # (D/g, g, g) the diagonal blocks, a view
        return (
            blocks.sum(axis=2, dtype=np.float64).reshape(d),
            blocks.sum(axis=1, dtype=np.float64).reshape(d),
        )
    dom = np.arange(d) // g
    inside = np.where(dom[:, None] == dom[None, :], m, 0)
    return inside.sum(axis=1, dtype=np.float64), inside.sum(axis=0, dtype=np.float64)


def _tier_sums(m: np.ndarray, domain_size: int) -> tuple[np.ndarray, ...]:
    """(D,) bytes each device sends and receives, in total and inside its domain, without
    the diagonal: one pass for the row sums, one for the column sums."""
    diag = np.diagonal(m).astype(np.float64)
    sent = m.sum(axis=1, dtype=np.float64) - diag
    recv = m.sum(axis=0, dtype=np.float64) - diag
    sent_up, recv_up = block_diagonal_sums(m, domain_size)
    return sent, recv, sent_up - diag, recv_up - diag


def port_times_us(
    nbytes: np.ndarray,
    hw: HardwareProfile,
    domain_size: int,
    out_scale: np.ndarray | None = None,
) -> A2ATimes:
    """Port-limited transfer time of each device for the (D, D) byte matrix ``nbytes``
    (src → dst), without latency.

    The diagonal (data that stays on a device) costs nothing. ``out_scale`` (D,) scales
    each device's scale-out port bandwidth (a degraded NIC).
    """
    sent, recv, sent_up, recv_up = _tier_sums(nbytes, domain_size)
    sent_out, recv_out = sent - sent_up, recv - recv_up
    bw_up = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up * 1e3  # bytes/µs
    bw_out: float | np.ndarray = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
    if out_scale is not None:
        bw_out = bw_out * out_scale
    t_up = np.maximum(sent_up, recv_up) / bw_up
    t_out = np.maximum(sent_out, recv_out) / bw_out
    return A2ATimes(
        time_us=np.maximum(t_up, t_out),
        sent_bytes=sent,
        recv_bytes=recv,
        cross_domain_bytes=float(sent_out.sum()),
        uses_up=(sent_up + recv_up) > 0,
        uses_out=(sent_out + recv_out) > 0,
    )


def a2a_times_us(
    nbytes: np.ndarray,
    hw: HardwareProfile,
    domain_size: int,
    out_scale: np.ndarray | None = None,
) -> A2ATimes:
    """:func:`port_times_us` plus the latency of the slowest fabric tier each device uses."""
    ports = port_times_us(nbytes, hw, domain_size, out_scale)
    latency = np.maximum(
        np.where(ports.uses_up, hw.scale_up.latency_us, 0.0),
        np.where(ports.uses_out, hw.scale_out.latency_us, 0.0),
    )
    return replace(ports, time_us=latency + ports.time_us)
