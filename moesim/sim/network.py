"""Analytic all-to-all time: each device limited by its own ports, per fabric tier.

Inside a scale-up domain (NVLink/NVSwitch, Infinity Fabric, ICI) bytes move at the
device's scale-up bandwidth; between domains at its scale-out (NIC) bandwidth. Both
tiers run at once, each direction independently, so a device's transfer time is::

    latency + max(send_up, recv_up) / bw_up  ∨  max(send_out, recv_out) / bw_out

where ``∨`` is max and latency is that of the slowest tier the device uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.hardware import HardwareProfile

__all__ = ["A2ATimes", "a2a_times_us", "domain_of", "port_times_us"]


def domain_of(num_devices: int, domain_size: int) -> np.ndarray:
    """(D,) scale-up domain index of each device (consecutive devices share a domain)."""
    return np.arange(num_devices) // domain_size


@dataclass(frozen=True)
class A2ATimes:
    """Per-device results of one all-to-all. All arrays are (D,)."""

    time_us: np.ndarray
    sent_bytes: np.ndarray
    recv_bytes: np.ndarray
    cross_domain_bytes: float


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
    d = nbytes.shape[0]
    m = nbytes.astype(np.float64).copy()
    np.fill_diagonal(m, 0.0)
    dom = domain_of(d, domain_size)
    same = dom[:, None] == dom[None, :]
    up, out = np.where(same, m, 0.0), np.where(same, 0.0, m)
    bw_up = hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up * 1e3  # bytes/µs
    bw_out: float | np.ndarray = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out * 1e3
    if out_scale is not None:
        bw_out = bw_out * out_scale
    t_up = np.maximum(up.sum(axis=1), up.sum(axis=0)) / bw_up
    t_out = np.maximum(out.sum(axis=1), out.sum(axis=0)) / bw_out
    return A2ATimes(
        time_us=np.maximum(t_up, t_out),
        sent_bytes=m.sum(axis=1),
        recv_bytes=m.sum(axis=0),
        cross_domain_bytes=float(out.sum()),
    )


def a2a_times_us(
    nbytes: np.ndarray,
    hw: HardwareProfile,
    domain_size: int,
    out_scale: np.ndarray | None = None,
) -> A2ATimes:
    """:func:`port_times_us` plus the latency of the slowest fabric tier each device uses."""
    ports = port_times_us(nbytes, hw, domain_size, out_scale)
    m = nbytes.astype(np.float64).copy()
    np.fill_diagonal(m, 0.0)
    dom = domain_of(m.shape[0], domain_size)
    same = dom[:, None] == dom[None, :]
    uses_up = ((m * same).sum(axis=1) + (m * same).sum(axis=0)) > 0
    uses_out = ((m * ~same).sum(axis=1) + (m * ~same).sum(axis=0)) > 0
    latency = np.maximum(
        np.where(uses_up, hw.scale_up.latency_us, 0.0),
        np.where(uses_out, hw.scale_out.latency_us, 0.0),
    )
    return A2ATimes(
        time_us=latency + ports.time_us,
        sent_bytes=ports.sent_bytes,
        recv_bytes=ports.recv_bytes,
        cross_domain_bytes=ports.cross_domain_bytes,
    )
