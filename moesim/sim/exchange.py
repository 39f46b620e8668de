"""Per-device times of one exchange (all-to-all or similar) in either network tier.

* ``analytic`` — each device limited by its own ports, per fabric tier (see
  :mod:`moesim.sim.network`), plus the latency of its longest path.
* ``flow`` — every (src, dst) transfer a flow on its topology path, links shared max-min
  fairly (see :mod:`moesim.sim.flows`). A device's time is when the last of the flows it
  sends or receives ends.

On a non-blocking fabric the two agree; on an oversubscribed spine or a torus the flow
tier shows the contention the analytic tier cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from moesim.hardware import HardwareProfile
from moesim.scenario import FLOW_REL_TOL
from moesim.sim.flows import simulate_flows
from moesim.sim.network import port_times_us
from moesim.topology.build import Topology

__all__ = [
    "LINK_LOADS_MAX_DEVICES",
    "ExchangeTimes",
    "Tier",
    "busiest_link",
    "exchange_times",
]

Tier = Literal["analytic", "flow"]

#: link loads route every (src, dst) pair: up to this many devices (65,536 pairs)
LINK_LOADS_MAX_DEVICES = 256


@dataclass(frozen=True)
class ExchangeTimes:
    """(D,) arrays: time of each device, bytes it sends and receives."""

    time_us: np.ndarray
    sent_bytes: np.ndarray
    recv_bytes: np.ndarray
    events: int
    port_us: np.ndarray | None = None  # analytic tier: the port-limited part of time_us
    latency_us: np.ndarray | None = None  # analytic tier: the latency part

    def scaled(self, factor: float, *, reverse: bool = False) -> ExchangeTimes:
        """The times of the same traffic with every byte count times ``factor``, and with
        ``reverse`` every transfer in the opposite direction (a combine after its dispatch).

        Exact: bandwidth times are linear in the bytes, latencies are not. Ports are full
        duplex and a device's time is its busier direction, so reversing swaps what it
        sends and receives and leaves its time unchanged. Analytic tier only: a flow-tier
        exchange is timed in the engine's loop (:mod:`moesim.sim.fabric`), or again at the
        new size."""
        if self.port_us is None or self.latency_us is None:
            raise ValueError("flow-tier exchange times do not rescale: time the new traffic")
        if factor == 1.0 and not reverse:  # the same traffic: the same times
            return self
        sent, recv = (
            (self.recv_bytes, self.sent_bytes) if reverse else (self.sent_bytes, self.recv_bytes)
        )
        return ExchangeTimes(
            np.where(sent + recv > 0, self.port_us * factor + self.latency_us, 0.0),
            sent * factor,
            recv * factor,
            0,
            self.port_us * factor,
            self.latency_us,
        )


def _path_latency(topo: Topology, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    r = topo.routes(src, dst)
    lat = topo.latency_us[r.links]
    return np.add.reduceat(lat, r.indptr[:-1]) if lat.size else np.zeros(src.size)


def exchange_times(
    nbytes: np.ndarray,
    topo: Topology,
    hw: HardwareProfile,
    tier: Tier = "analytic",
    *,
    scale: float = 1.0,
    rel_tol: float = FLOW_REL_TOL,
) -> ExchangeTimes:
    """Times of the exchange given by the (D, D) byte matrix ``scale * nbytes`` (src → dst),
    e.g. token copies times the bytes of one copy. ``rel_tol``: the flow tier's tolerance
    (see :mod:`moesim.sim.flows`; 0 is exact)."""
    d = nbytes.shape[0]
    if tier == "analytic":
        ports = port_times_us(nbytes, hw, topo.domain_size, topo.nic_scale)
        if scale != 1.0:  # every figure of the analytic tier is linear in the bytes
            ports = replace(
                ports,
                time_us=ports.time_us * scale,
                sent_bytes=ports.sent_bytes * scale,
                recv_bytes=ports.recv_bytes * scale,
            )
        sent, recv = ports.sent_bytes, ports.recv_bytes
        classes = topo.tier_latency_us()
        if classes is not None:  # switched fabrics: latency by the tiers a device uses
            latency = np.maximum(
                np.where(ports.uses_up, classes[0], 0.0), np.where(ports.uses_out, classes[1], 0.0)
            )
        else:  # tori: the longest path a device's flows take
            m = np.asarray(nbytes, dtype=np.float64).copy()
            np.fill_diagonal(m, 0.0)
            src, dst = np.nonzero(m)
            latency = np.zeros(d)
            if src.size:
                lat = _path_latency(topo, src, dst)
                np.maximum.at(latency, src, lat)
                np.maximum.at(latency, dst, lat)
        return ExchangeTimes(
            np.where(sent + recv > 0, ports.time_us + latency, 0.0),
            sent,
            recv,
            0,
            ports.time_us,
            latency,
        )
    m = np.asarray(nbytes, dtype=np.float64) * scale
    np.fill_diagonal(m, 0.0)
    src, dst = np.nonzero(m)
    sent, recv = m.sum(axis=1), m.sum(axis=0)
    time = np.zeros(d)
    res = simulate_flows(
        topo.routes(src, dst), m[src, dst], topo.capacity_gbps, topo.latency_us, rel_tol=rel_tol
    )
    np.maximum.at(time, src, res.finish_us)
    np.maximum.at(time, dst, res.finish_us)
    return ExchangeTimes(time, sent, recv, res.events)


def busiest_link(m: np.ndarray, topo: Topology) -> tuple[int, float] | None:
    """The fabric link the (D, D) traffic ``m`` (src → dst) keeps busiest along the
    topology's paths (most load per unit of bandwidth: the bottleneck, which on a
    switched cluster is usually a NIC rather than the far faster scale-up link that
    carries more bytes), and its load in ``m``'s unit; None without traffic, or above
    :data:`LINK_LOADS_MAX_DEVICES` devices (every pair is routed)."""
    d = m.shape[0]
    if d > LINK_LOADS_MAX_DEVICES:
        return None
    mm = np.asarray(m, dtype=np.float64).copy()
    np.fill_diagonal(mm, 0.0)
    if not mm.any():
        return None
    # every pair's path, in (src, dst) order: pairs without traffic add zeros
    r = topo.pair_routes()
    load = np.bincount(
        r.links, weights=np.repeat(mm.reshape(-1), np.diff(r.indptr)), minlength=topo.num_links
    )
    i = int(np.argmax(load / topo.capacity_gbps))
    return i, float(load[i])
