"""Cluster topologies: networkx graphs of devices, switches and links, with vectorised routes."""

from moesim.topology.build import Routes, Topology, build_topology

__all__ = ["Routes", "Topology", "build_topology"]
