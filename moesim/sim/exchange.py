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

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.hardware import HardwareProfile
from moesim.sim.flows import simulate_flows
from moesim.sim.network import port_times_us
from moesim.topology.build import Topology

__all__ = ["ExchangeTimes", "Tier", "exchange_times"]

Tier = Literal["analytic", "flow"]


@dataclass(frozen=True)
class ExchangeTimes:
    """(D,) arrays: time of each device, bytes it sends and receives; plus totals."""

    time_us: np.ndarray
    sent_bytes: np.ndarray
    recv_bytes: np.ndarray
    cross_node_bytes: float
    events: int


def _path_latency(topo: Topology, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    r = topo.routes(src, dst)
    lat = topo.latency_us[r.links]
    return np.add.reduceat(lat, r.indptr[:-1]) if lat.size else np.zeros(src.size)


def exchange_times(
    nbytes: np.ndarray, topo: Topology, hw: HardwareProfile, tier: Tier = "analytic"
) -> ExchangeTimes:
    """Times of the exchange given by the (D, D) byte matrix ``nbytes`` (src → dst)."""
    d = nbytes.shape[0]
    m = np.asarray(nbytes, dtype=np.float64).copy()
    np.fill_diagonal(m, 0.0)
    src, dst = np.nonzero(m)
    node = np.arange(d) // topo.devices_per_node
    cross = float(m[node[:, None] != node[None, :]].sum())
    sent, recv = m.sum(axis=1), m.sum(axis=0)
    if tier == "analytic":
        ports = port_times_us(m, hw, topo.domain_size, topo.nic_scale)
        latency = np.zeros(d)
        if src.size:
            lat = _path_latency(topo, src, dst)
            np.maximum.at(latency, src, lat)
            np.maximum.at(latency, dst, lat)
        return ExchangeTimes(
            np.where(sent + recv > 0, ports.time_us + latency, 0.0), sent, recv, cross, 0
        )
    time = np.zeros(d)
    events = 0
    if src.size:
        res = simulate_flows(
            topo.routes(src, dst), m[src, dst], topo.capacity_gbps, topo.latency_us
        )
        np.maximum.at(time, src, res.finish_us)
        np.maximum.at(time, dst, res.finish_us)
        events = res.events
    return ExchangeTimes(time, sent, recv, cross, events)
