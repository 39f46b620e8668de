"""Cluster topologies built from a hardware profile and a cluster shape.

Every topology is a :class:`networkx.DiGraph` whose edges are *directed* links with
``bandwidth_gbps`` (GB/s, that direction) and ``latency_us`` attributes and an integer
``index``; node names are tuples such as ``("dev", 3)``, ``("nvswitch", 0)``,
``("leaf", rail, group)``, ``("spine", h)``. Routing between devices is computed for
whole arrays of (src, dst) pairs at once (:meth:`Topology.routes`), so thousands of
devices stay fast; the graph is there to inspect, draw and check the routes against.

Kinds (chosen from the profile's ``scale_up.topology``):

* ``nvswitch`` — scale-up domains of ``domain_size`` devices on one non-blocking switch
  (an HGX node, or a 72-GPU NVL72 rack), each device with one NIC on a rail-optimised
  two-level fat-tree: rail ``r`` (the device's index in its node) has one leaf switch per
  group of ``nodes_per_leaf`` nodes; leaves join spines with ``nodes_per_leaf`` uplinks
  each, of bandwidth ``NIC / oversubscription``. Traffic between domains goes
  NIC → leaf → (spine → leaf, the spine chosen by destination node modulo the uplinks, the
  usual deterministic "D-mod-k" fat-tree routing) → NIC.
* ``full-mesh`` — MI300X-style nodes: a direct link between every pair of devices of a
  node (the device's scale-up bandwidth split over its peers); same fat-tree outside.
* ``torus-2d`` / ``torus-3d`` — TPU slices: a torus with wrap-around, one link per
  direction per dimension, dimension-order routing (x, then y, then z; the shorter way
  round, ties going the positive way). Slices larger than the scale-up domain are not
  modelled yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import networkx as nx
import numpy as np

from moesim.errors import InputError
from moesim.hardware import HardwareProfile

__all__ = ["Routes", "Topology", "build_topology", "torus_dims"]

#: up to this many devices a topology routes every (src, dst) pair once, on first use, and
#: looks paths up from that table (65,280 pairs at 256 devices)
ROUTE_TABLE_MAX_DEVICES = 256


@dataclass(frozen=True)
class Routes:
    """Paths of F flows in CSR form: flow f uses ``links[indptr[f]:indptr[f+1]]`` in order."""

    indptr: np.ndarray  # (F+1,) int64
    links: np.ndarray  # (nnz,) int64

    @property
    def num_flows(self) -> int:
        return int(self.indptr.size - 1)

    def hops(self) -> np.ndarray:
        return np.diff(self.indptr)

    def path(self, f: int) -> list[int]:
        return self.links[self.indptr[f] : self.indptr[f + 1]].tolist()


class _LinkTable:
    """Collects directed links while a topology is built."""

    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self.bw: list[float] = []
        self.lat: list[float] = []

    def add(self, a: Any, b: Any, bw_gbps: float, lat_us: float) -> int:
        i = len(self.bw)
        self.graph.add_edge(a, b, bandwidth_gbps=bw_gbps, latency_us=lat_us, index=i)
        self.bw.append(bw_gbps)
        self.lat.append(lat_us)
        return i

    def pair(self, a: Any, b: Any, bw_gbps: float, lat_us: float) -> tuple[int, int]:
        return self.add(a, b, bw_gbps, lat_us), self.add(b, a, bw_gbps, lat_us)


def torus_dims(n: int, ndim: int) -> tuple[int, ...]:
    """Near-cubic factorisation of ``n`` devices into ``ndim`` torus dimensions."""
    dims = [1] * ndim
    rest = n
    for i in range(ndim, 0, -1):
        target = round(rest ** (1 / i))
        best = max(d for d in range(1, rest + 1) if rest % d == 0 and d <= max(target, 1))
        dims[ndim - i] = best
        rest //= best
    dims[-1] *= rest
    return tuple(sorted(dims))


@dataclass(frozen=True)
class Topology:
    """A cluster's devices and links; see the module docstring for the kinds."""

    kind: str
    num_devices: int
    devices_per_node: int
    domain_size: int
    graph: nx.DiGraph = field(repr=False)
    capacity_gbps: np.ndarray = field(repr=False)  # (num_links,)
    latency_us: np.ndarray = field(repr=False)  # (num_links,)
    tables: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    dims: tuple[int, ...] = ()
    nic_scale: np.ndarray | None = field(repr=False, default=None)  # (D,) degraded NICs

    def degrade_nics(self, scale: dict[int, float]) -> Topology:
        """A copy whose listed devices' NIC links (both directions) run at ``scale`` of their
        capacity, e.g. ``{3: 0.5}`` for a NIC at half speed."""
        if not scale:
            return self
        if "nic_up" not in self.tables:
            raise InputError(
                "this topology has no NICs to degrade", field="degraded_nics", value=sorted(scale)
            )
        cap = self.capacity_gbps.copy()
        nic = np.ones(self.num_devices) if self.nic_scale is None else self.nic_scale.copy()
        for dev, factor in scale.items():
            if not 0 <= dev < self.num_devices or factor <= 0:
                raise InputError(
                    "needs a device in range and a positive factor",
                    field="degraded_nics",
                    value={dev: factor},
                )
            cap[self.tables["nic_up"][dev]] *= factor
            cap[self.tables["nic_down"][dev]] *= factor
            nic[dev] *= factor
        return replace(self, capacity_gbps=cap, nic_scale=nic)

    @property
    def num_links(self) -> int:
        return int(self.capacity_gbps.size)

    def link_name(self, i: int) -> tuple[Any, Any]:
        """The (from, to) graph nodes of link ``i``."""
        if i not in self._link_ends:
            raise IndexError(i)
        return self._link_ends[i]

    @cached_property
    def _link_ends(self) -> dict[int, tuple[Any, Any]]:
        return {idx: (a, b) for a, b, idx in self.graph.edges(data="index")}

    def routes(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        """Paths (as link indices) of flows ``src[f] → dst[f]``; src must differ from dst.

        Up to :data:`ROUTE_TABLE_MAX_DEVICES` devices the paths come from a table of every
        pair's, routed once per topology by the same rules (so the same paths)."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if (src == dst).any():
            raise ValueError("a flow needs distinct endpoints")
        if self.num_devices <= ROUTE_TABLE_MAX_DEVICES:
            table = self.pair_routes()
            pair = src * self.num_devices + dst
            lengths = table.indptr[pair + 1] - table.indptr[pair]
            indptr = np.zeros(src.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=indptr[1:])
            at = np.repeat(table.indptr[pair] - indptr[:-1], lengths)
            return Routes(indptr=indptr, links=table.links[at + np.arange(indptr[-1])])
        return self._route(src, dst)

    def _route(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        if self.kind.startswith("torus"):
            return self._torus_routes(src, dst)
        return self._tree_routes(src, dst)

    def pair_routes(self) -> Routes:
        """Paths of every ordered pair of devices, flow ``src * D + dst`` (a device to
        itself: no links); routed once per topology and kept (D² pairs: for clusters up
        to :data:`ROUTE_TABLE_MAX_DEVICES`)."""
        return self._pair_routes

    @cached_property
    def _pair_routes(self) -> Routes:
        d = self.num_devices
        src, dst = np.divmod(np.arange(d * d, dtype=np.int64), d)
        off = src != dst
        r = self._route(src[off], dst[off])
        lengths = np.zeros(d * d, dtype=np.int64)
        lengths[off] = np.diff(r.indptr)
        indptr = np.zeros(d * d + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return Routes(indptr=indptr, links=r.links)

    def tier_latency_us(self) -> tuple[float, float] | None:
        """Path latency inside a scale-up domain and between domains, for the switched
        kinds, where it depends on nothing else (every link of a kind has one latency;
        spine hops add none, the profile's scale-out figure being end to end). None for
        tori, whose latency grows with the hop count."""
        return self._tier_latency

    @cached_property
    def _tier_latency(self) -> tuple[float, float] | None:
        if self.kind.startswith("torus"):
            return None
        t, lat = self.tables, self.latency_us
        if self.kind == "full-mesh":
            up = float(lat[t["mesh"][t["mesh"] >= 0]].max(initial=0.0))
        else:
            up = float(lat[t["up"]].max(initial=0.0) + lat[t["down"]].max(initial=0.0))
        spine = float(
            lat[t["leaf_up"]].max(initial=0.0) + lat[t["leaf_down"]].max(initial=0.0)
            if self.num_devices > self.domain_size
            else 0.0
        )
        if spine:
            return None  # direct and via-spine paths differ: ask the paths
        return up, float(lat[t["nic_up"]].max(initial=0.0) + lat[t["nic_down"]].max(initial=0.0))

    # ----- switched nodes + fat-tree --------------------------------------------------------
    def one_leaf(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """(F,) whether a path from device ``src`` to ``dst`` in another scale-up domain
        stays on one leaf switch (same rail, same leaf group) rather than crossing a spine
        (switched kinds)."""
        g = self.devices_per_node
        per_leaf = int(self.tables["nodes_per_leaf"][0])
        return (src % g == dst % g) & ((src // g) // per_leaf == (dst // g) // per_leaf)

    def spine_of(self, dst_node: np.ndarray) -> np.ndarray:
        """The spine a path into node ``dst_node`` crosses: chosen by destination node
        modulo the leaf's uplinks (the usual deterministic "D-mod-k" fat-tree routing)."""
        return dst_node % self.tables["leaf_up"].shape[1]

    def _tree_routes(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        t = self.tables
        f = src.size
        same_dom = src // self.domain_size == dst // self.domain_size
        g = self.devices_per_node
        rail_s, rail_d = src % g, dst % g
        grp_s = (src // g) // int(t["nodes_per_leaf"][0])
        grp_d = (dst // g) // int(t["nodes_per_leaf"][0])
        direct = ~same_dom & self.one_leaf(src, dst)
        via_spine = ~same_dom & ~direct
        mesh = self.kind == "full-mesh"
        lengths = np.where(same_dom, 1 if mesh else 2, np.where(direct, 2, 4))
        indptr = np.zeros(f + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        links = np.empty(int(indptr[-1]), dtype=np.int64)
        start = indptr[:-1]
        if mesh:
            i = np.flatnonzero(same_dom)
            links[start[i]] = t["mesh"][src[i], dst[i] % g]
        else:
            i = np.flatnonzero(same_dom)
            links[start[i]] = t["up"][src[i]]
            links[start[i] + 1] = t["down"][dst[i]]
        i = np.flatnonzero(direct)
        links[start[i]] = t["nic_up"][src[i]]
        links[start[i] + 1] = t["nic_down"][dst[i]]
        i = np.flatnonzero(via_spine)
        if i.size:
            h = self.spine_of(dst[i] // g)
            leaf_s = rail_s[i] * t["groups"][0] + grp_s[i]
            leaf_d = rail_d[i] * t["groups"][0] + grp_d[i]
            links[start[i]] = t["nic_up"][src[i]]
            links[start[i] + 1] = t["leaf_up"][leaf_s, h]
            links[start[i] + 2] = t["leaf_down"][leaf_d, h]
            links[start[i] + 3] = t["nic_down"][dst[i]]
        return Routes(indptr=indptr, links=links)

    # ----- torus ----------------------------------------------------------------------------
    def _torus_routes(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        dims = np.array(self.dims)
        nd = dims.size
        strides = np.concatenate(([1], np.cumprod(dims)[:-1]))
        cs = (src[:, None] // strides) % dims  # (F, nd) coordinates
        cd = (dst[:, None] // strides) % dims
        fwd = (cd - cs) % dims
        back = (cs - cd) % dims
        positive = fwd <= back
        hops = np.where(positive, fwd, back)  # (F, nd)
        total = hops.sum(axis=1)
        indptr = np.zeros(src.size + 1, dtype=np.int64)
        np.cumsum(total, out=indptr[1:])
        links = np.empty(int(indptr[-1]), dtype=np.int64)
        cur = cs.copy()
        pos = indptr[:-1].copy()
        link_tab = self.tables["torus"]  # (D, nd, 2): link from device along dim, dir (0:+, 1:-)
        for d in range(nd):
            step = np.where(positive[:, d], 1, -1)
            for hop in range(int(hops[:, d].max(initial=0))):
                m = hops[:, d] > hop
                dev = (cur[m] * strides).sum(axis=1)
                links[pos[m]] = link_tab[dev, d, np.where(positive[m, d], 0, 1)]
                pos[m] += 1
                cur[m, d] = (cur[m, d] + step[m]) % dims[d]
        return Routes(indptr=indptr, links=links)


def build_topology(
    hw: HardwareProfile,
    num_devices: int,
    devices_per_node: int,
    *,
    oversubscription: float = 1.0,
    nodes_per_leaf: int | None = None,
    dims: tuple[int, ...] | None = None,
    achievable: bool = True,
) -> Topology:
    """Build the topology of ``num_devices`` devices of ``hw``.

    Edge ``bandwidth_gbps`` attributes are the profile's peak figures; ``capacity_gbps``
    (what the network tiers use) is peak × the profile's efficiency factor of that fabric
    when ``achievable`` (the default), else the peak.

    Args:
        oversubscription: leaf downlink / uplink bandwidth ratio of the fat-tree (1 = non-blocking).
        nodes_per_leaf: nodes one leaf switch serves per rail (its downlink count); default
            32, or one rack when a scale-up domain spans nodes (NVL72: 18 trays).
        dims: torus dimensions for TPU profiles (default: near-cubic factorisation).
    """
    if oversubscription < 1:
        raise InputError(
            "oversubscription must be at least 1", field="oversubscription", value=oversubscription
        )
    up = hw.scale_up
    lt = _LinkTable()
    for d in range(num_devices):
        lt.graph.add_node(("dev", d), kind="device", node=d // devices_per_node)
    if up.topology.startswith("torus"):
        nd = 3 if up.topology == "torus-3d" else 2
        dims = tuple(dims) if dims else torus_dims(num_devices, nd)
        if math.prod(dims) != num_devices or len(dims) != nd:
            raise InputError(
                f"torus dims must be {nd} numbers whose product is {num_devices}",
                field="dims",
                value=list(dims),
            )
        if num_devices > up.domain_size:
            raise InputError(
                f"{hw.name} slices hold at most {up.domain_size} chips",
                field="devices",
                value=num_devices,
            )
        strides = np.concatenate(([1], np.cumprod(dims)[:-1]))
        per_link = up.bandwidth_gbps / (2 * nd)
        tab = np.full((num_devices, nd, 2), -1, dtype=np.int64)
        for dev in range(num_devices):
            coord = (dev // strides) % np.array(dims)
            for k in range(nd):
                for dirn, delta in ((0, 1), (1, -1)):
                    nb = coord.copy()
                    nb[k] = (nb[k] + delta) % dims[k]
                    other = int((nb * strides).sum())
                    if other == dev:
                        continue
                    tab[dev, k, dirn] = lt.add(
                        ("dev", dev), ("dev", other), per_link, up.latency_us
                    )
        return Topology(
            kind=up.topology,
            num_devices=num_devices,
            devices_per_node=devices_per_node,
            domain_size=num_devices,
            graph=lt.graph,
            capacity_gbps=np.array(lt.bw) * (hw.efficiency.scale_up if achievable else 1.0),
            latency_us=np.array(lt.lat),
            tables={"torus": tab},
            dims=dims,
        )

    g = devices_per_node
    domain = up.domain_size if up.domain_size > hw.devices_per_node else min(g, up.domain_size)
    if domain % g and g % domain:
        raise InputError(
            f"devices per node ({g}) must divide the scale-up domain ({domain})",
            field="devices_per_node",
            value=g,
        )
    domain = max(domain, 1)
    tables: dict[str, np.ndarray] = {}
    if up.topology == "full-mesh":
        per_peer = up.bandwidth_gbps / max(g - 1, 1)
        mesh = np.full((num_devices, g), -1, dtype=np.int64)
        for node in range(math.ceil(num_devices / g)):
            members = range(node * g, min((node + 1) * g, num_devices))
            for a in members:
                for b in members:
                    if a != b:
                        mesh[a, b % g] = lt.add(("dev", a), ("dev", b), per_peer, up.latency_us)
        tables["mesh"] = mesh
        domain = g
    else:  # nvswitch: one non-blocking switch per scale-up domain
        upl = np.empty(num_devices, dtype=np.int64)
        down = np.empty(num_devices, dtype=np.int64)
        for d in range(num_devices):
            sw = ("nvswitch", d // domain)
            upl[d], down[d] = lt.pair(("dev", d), sw, up.bandwidth_gbps, up.latency_us / 2)
        tables["up"], tables["down"] = upl, down
    # rail-optimised fat-tree between domains (every link from here on is scale-out)
    if nodes_per_leaf is None:
        nodes_per_leaf = domain // g if domain > g else 32
    n_scale_up_links = len(lt.bw)
    out = hw.scale_out
    nodes = math.ceil(num_devices / g)
    groups = math.ceil(nodes / nodes_per_leaf)
    nic_up = np.empty(num_devices, dtype=np.int64)
    nic_down = np.empty(num_devices, dtype=np.int64)
    for d in range(num_devices):
        leaf = ("leaf", d % g, (d // g) // nodes_per_leaf)
        # the profile's scale-out latency is end to end: split over the two NIC links
        nic_up[d], nic_down[d] = lt.pair(("dev", d), leaf, out.bandwidth_gbps, out.latency_us / 2)
    n_up = nodes_per_leaf
    uplink_bw = out.bandwidth_gbps / oversubscription
    leaf_up = np.empty((g * groups, n_up), dtype=np.int64)
    leaf_down = np.empty((g * groups, n_up), dtype=np.int64)
    if nodes * g > domain:  # spines only matter when traffic leaves a domain
        for rail in range(g):
            for grp in range(groups):
                for h in range(n_up):
                    leaf_up[rail * groups + grp, h], leaf_down[rail * groups + grp, h] = lt.pair(
                        ("leaf", rail, grp), ("spine", h), uplink_bw, 0.0
                    )
    tables |= {
        "nic_up": nic_up,
        "nic_down": nic_down,
        "leaf_up": leaf_up,
        "leaf_down": leaf_down,
        "groups": np.array([groups]),
        "nodes_per_leaf": np.array([nodes_per_leaf]),
    }
    kind = "full-mesh" if up.topology == "full-mesh" else "nvswitch"
    capacity = np.array(lt.bw)
    if achievable:
        capacity[:n_scale_up_links] *= hw.efficiency.scale_up
        capacity[n_scale_up_links:] *= hw.efficiency.scale_out
    return Topology(
        kind=kind,
        num_devices=num_devices,
        devices_per_node=g,
        domain_size=domain,
        graph=lt.graph,
        capacity_gbps=capacity,
        latency_us=np.array(lt.lat),
        tables=tables,
    )
