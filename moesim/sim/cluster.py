"""The simulated cluster: its devices, topology, and how the flow tier sees its network.

:class:`ClusterSpec` is what every later stage reads of the cluster; for the flow tier it
builds the fabric of a step and turns a traffic matrix into flows at the scenario's
granularity (:func:`resolve_granularity`: ``device`` flows, or ``rail`` / ``node``
bundles, :mod:`moesim.sim.transfers`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from moesim.scenario import FLOW_REL_TOL, HOT_DEVICE
from moesim.sim.exchange import Tier
from moesim.sim.fabric import Fabric
from moesim.sim.transfers import FlowSet, NodeLinks, node_links, node_traffic, rail_traffic
from moesim.topology.build import Topology

__all__ = ["AUTO_DEVICE_PAIRS", "ClusterSpec", "resolve_granularity"]


@dataclass(frozen=True)
class ClusterSpec:
    """The simulated cluster: its devices, topology and how exchanges are timed."""

    num_devices: int
    devices_per_node: int
    topology: Topology
    network: Tier = "analytic"
    flow_rel_tol: float = FLOW_REL_TOL  # the flow tier's tolerance (0: exact)
    granularity: str = "device"  # the flow tier's: "device", "rail" or "node" (auto resolved)
    hot_device: float = HOT_DEVICE  # node granularity: see moesim.sim.transfers

    @property
    def domain_size(self) -> int:
        """Devices sharing one scale-up fabric."""
        return self.topology.domain_size

    @cached_property
    def node_links(self) -> NodeLinks:
        """The node-level links of ``granularity: node`` (:mod:`moesim.sim.transfers`)."""
        return node_links(self.topology)

    def fabric(self) -> Fabric | None:
        """A fresh fabric for one step of the flow tier; None for the analytic tier."""
        if self.network != "flow":
            return None
        if self.granularity == "node":
            nl = self.node_links
            links = (nl.capacity_gbps, nl.latency_us)
            return Fabric(self.topology, rel_tol=self.flow_rel_tol, links=links)
        return Fabric(self.topology, rel_tol=self.flow_rel_tol)

    def flows(self, m: np.ndarray, *, combine: bool = False) -> FlowSet:
        """The flow tier's transfers of the (D, D) matrix ``m`` at this granularity;
        ``combine``: ``m`` is a combine's (the transpose of its dispatch), which the rail
        path takes the other way round."""
        if self.granularity == "device":
            return FlowSet.from_matrix(m)
        if self.granularity == "rail":
            inside, bundles = rail_traffic(m, self.topology, combine=combine)
        else:
            inside, bundles = node_traffic(m, self.topology, self.node_links, self.hot_device)
        return replace(FlowSet.from_matrix(inside), bundles=bundles)


#: ``granularity: auto`` keeps a flow per device pair up to this many pairs (256 devices:
#: a DeepSeek-V3 training step in about a minute on a 2-core VM), node bundles beyond
AUTO_DEVICE_PAIRS = 65_536


def resolve_granularity(granularity: str, topology: Topology) -> str:
    """``device``, ``rail`` or ``node``: ``auto`` picks device flows while they stay within
    :data:`AUTO_DEVICE_PAIRS`, node bundles beyond. Tori, single-domain clusters and
    clusters with a partial node keep device flows."""
    d, g = topology.num_devices, topology.devices_per_node
    if topology.kind.startswith("torus") or d <= topology.domain_size or d % g:
        return "device"
    if granularity == "auto":
        return "device" if d**2 <= AUTO_DEVICE_PAIRS else "node"
    return granularity
