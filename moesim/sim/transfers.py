"""The flow tier's transfers: device flows, and bundles for large clusters.

:class:`FlowSet` is what a flow-tier exchange hands the engine: a flow per (src, dst)
device pair with traffic, and at ``network.granularity: node`` the bundles below.

Bundles (``granularity: node``).

At ``device`` granularity every (src, dst) pair with traffic is a flow: D² flows per
exchange. At ``node`` granularity a device's traffic to another node is one bundle (per
path class), about D²/g flows for nodes of g devices:

* links: the device topology's links, then per node an *in* port of the summed capacity
  of its NICs, and per (leaf group, spine) a downlink of the summed capacity of the
  group's rail leaves' links from that spine;
* a bundle's path: the sender's own NIC, then the destination node's in port when its
  member pairs stay on one leaf (same rail, same leaf group), else the sender's rail leaf
  up to the spine (chosen by destination node, D-mod-k, as device paths choose it), the
  destination group's pooled downlink and the in port;
* its weight is its member count: it takes the max-min share of as many flows; it is
  released when its sender is ready, as device flows are;
* its sender is busy with it to the end; each receiver until its own bytes would be
  through were the members to drain at equal rates (:func:`_member_fractions`);
* pairs inside a scale-up domain, and pairs into a *hot* receiver (more bytes per unit of
  NIC than ``hot`` x its node's mean: a popular expert's device, a degraded NIC), stay
  device flows, so the NIC that limits a hot receiver still limits it.

What this loses against device flows: a cold receiver's own NIC and rail leaf (pooled
with its node's and group's), and the spread of end times among a bundle's receivers.
``benchmarks/flow_granularity.py`` measures the error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from moesim.scenario import HOT_RECEIVER
from moesim.sim.flows import KeyIndex, _gather_index, _sub_paths
from moesim.topology.build import Routes, Topology

__all__ = ["Bundles", "FlowSet", "NodeLinks", "bundle_traffic", "node_links"]


@dataclass(frozen=True)
class NodeLinks:
    """The device topology's links followed by the node-level ones."""

    capacity_gbps: np.ndarray
    latency_us: np.ndarray
    in_port: np.ndarray  # (nodes,) link index
    group_down: np.ndarray  # (groups, spines) link index; empty without spines
    devices_per_node: int
    nodes_per_leaf: int


def node_links(topo: Topology) -> NodeLinks:
    """Node in ports and group downlinks built on ``topo`` (a switched kind)."""
    if topo.kind.startswith("torus"):
        raise ValueError("node granularity needs a switched fabric (tori keep device flows)")
    t = topo.tables
    g = topo.devices_per_node
    nodes = -(-topo.num_devices // g)
    node = np.arange(topo.num_devices) // g
    cap = np.asarray(topo.capacity_gbps, dtype=np.float64)
    lat = np.asarray(topo.latency_us, dtype=np.float64)
    in_port = cap.size + np.arange(nodes)
    caps = [cap, np.bincount(node, weights=cap[t["nic_down"]], minlength=nodes)]
    lats = [lat, np.full(nodes, lat[t["nic_down"]].max())]
    groups = int(t["groups"][0])
    leaf_down = t["leaf_down"]  # (rails * groups, spines)
    group_down = np.zeros((0, 0), dtype=np.int64)
    if topo.num_devices > topo.domain_size:  # spines
        # leaf (rail, group) is row rail * groups + group: sum over the rails of each group
        rows = np.arange(g)[:, None] * groups + np.arange(groups)[None, :]  # (rails, groups)
        spines = leaf_down.shape[1]
        group_down = cap.size + nodes + np.arange(groups * spines).reshape(groups, spines)
        caps.append(cap[leaf_down[rows]].sum(axis=0).ravel())
        lats.append(lat[leaf_down[rows]].max(axis=0).ravel())
    return NodeLinks(
        capacity_gbps=np.concatenate(caps),
        latency_us=np.concatenate(lats),
        in_port=in_port,
        group_down=group_down,
        devices_per_node=g,
        nodes_per_leaf=int(t["nodes_per_leaf"][0]),
    )


@dataclass(frozen=True, eq=False)
class Bundles:
    """Bundles of one exchange: (B,) sender, bytes, weight (member pairs), their paths on
    :class:`NodeLinks`, and the devices each touches (CSR)."""

    src: np.ndarray
    nbytes: np.ndarray
    weight: np.ndarray
    routes: Routes
    touch_ptr: np.ndarray
    touch_dev: np.ndarray
    touch_frac: np.ndarray  # share of the bundle's time each touched device is busy in it

    @cached_property
    def _by_sender(self) -> KeyIndex:
        return KeyIndex.of(self.src)

    def of_senders(self, devices: np.ndarray) -> np.ndarray:
        """Indices of the bundles sent by ``devices`` (sorted ids)."""
        return self._by_sender.rows(devices)

    def touched(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The devices bundles ``b`` touch, one entry per (bundle, device), and the share of
        the bundle's time each is busy in it."""
        at = _gather_index(self.touch_ptr, b)
        return self.touch_dev[at], self.touch_frac[at]

    def sub_routes(self, b: np.ndarray) -> Routes:
        ptr, links = _sub_paths(self.routes.indptr, self.routes.links, b)
        return Routes(ptr, links)


def bundle_traffic(
    m: np.ndarray, topo: Topology, nl: NodeLinks, hot: float = HOT_RECEIVER
) -> tuple[np.ndarray, Bundles]:
    """Split the (D, D) byte matrix ``m``: returns the matrix of the pairs kept as device
    flows and the bundles of every other pair.

    A bundle joins the pairs from one device to one other node: the sender keeps its own
    NIC and rail leaf, the receivers share their node's pooled port. Pairs inside a
    scale-up domain, and pairs into a *hot* receiver (more bytes per unit of NIC than
    ``hot`` x its node's mean: a popular expert's device, a degraded NIC), stay device
    flows, so the NIC that limits a hot receiver still limits it. Senders are never pooled:
    each releases its flows when it is ready, as at device granularity."""
    d = m.shape[0]
    g = nl.devices_per_node
    dom = np.arange(d) // topo.domain_size
    mm = np.asarray(m, dtype=np.float64)
    src, dst = np.nonzero(mm)
    cross = dom[src] != dom[dst]
    # receivers whose NIC the pooled port would hide keep device flows
    recv = np.bincount(dst[cross], weights=mm[src[cross], dst[cross]], minlength=d)
    load = recv / topo.capacity_gbps[topo.tables["nic_down"]]
    node_mean = np.repeat(load.reshape(-1, g).mean(axis=1), g) if d % g == 0 else load.mean()
    keep = ~cross | (load > hot * node_mean)[dst]
    inside = np.zeros_like(mm)
    inside[src[keep], dst[keep]] = mm[src[keep], dst[keep]]
    src, dst = src[~keep], dst[~keep]
    nbytes = mm[src, dst]
    nt = dst // g
    per_leaf = nl.nodes_per_leaf
    direct = topo.one_leaf(src, dst)
    # a bundle: (sender, destination node, path class)
    key = (src.astype(np.int64) * nl.in_port.size + nt) * 2 + (~direct)
    uniq, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    b_src, b_dst = (uniq // 2) // nl.in_port.size, (uniq // 2) % nl.in_port.size
    b_spine = (uniq % 2).astype(bool)
    first, last = topo.tables["nic_up"][b_src], nl.in_port[b_dst]
    weight = np.bincount(inv, minlength=uniq.size).astype(np.float64)
    b_bytes = np.bincount(inv, weights=nbytes, minlength=uniq.size)
    hops = np.where(b_spine, 4, 2)
    ptr = np.zeros(uniq.size + 1, dtype=np.int64)
    np.cumsum(hops, out=ptr[1:])
    links = np.empty(int(ptr[-1]), dtype=np.int64)
    start = ptr[:-1]
    links[start] = first
    two = np.flatnonzero(~b_spine)
    links[start[two] + 1] = last[two]
    sp = np.flatnonzero(b_spine)
    if sp.size:  # the sender's own rail leaf up, the receivers' group pooled down
        h = topo.spine_of(b_dst[sp])
        rail, groups = b_src[sp] % g, nl.group_down.shape[0]
        links[start[sp] + 1] = topo.tables["leaf_up"][
            rail * groups + (b_src[sp] // g) // per_leaf, h
        ]
        links[start[sp] + 2] = nl.group_down[b_dst[sp] // per_leaf, h]
        links[start[sp] + 3] = last[sp]
    # the devices each bundle touches: its sender (busy all of the bundle's time) and its
    # receivers, each busy its share of the way through
    frac = _member_fractions(inv, nbytes, uniq.size)
    touch = np.concatenate((inv * d + dst, inv * d + src))
    share = np.concatenate((frac, np.ones(src.size)))
    order = np.lexsort((-share, touch))  # per (bundle, device) the largest share first
    touch, share = touch[order], share[order]
    first = np.r_[True, touch[1:] != touch[:-1]]
    pairs, touch_frac = touch[first], share[first]
    touch_b, touch_dev = pairs // d, pairs % d
    touch_ptr = np.zeros(uniq.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(touch_b, minlength=uniq.size), out=touch_ptr[1:])
    bundles = Bundles(
        src=b_src.astype(np.int64),
        nbytes=b_bytes,
        weight=weight,
        routes=Routes(ptr, links),
        touch_ptr=touch_ptr,
        touch_dev=touch_dev.astype(np.int64),
        touch_frac=touch_frac,
    )
    return inside, bundles


def _member_fractions(inv: np.ndarray, nbytes: np.ndarray, n: int) -> np.ndarray:
    """Per member pair (bundle ``inv``, ``nbytes``): when it would end, as a share of its
    bundle's time, were the members to drain at equal rates (a max-min share each): with
    the bundle's sizes sorted x1 <= ... <= xk summing to S, member i ends at
    (x1 + ... + x(i-1) + (k - i + 1) xi) / S."""
    order = np.lexsort((nbytes, inv))
    b, x = inv[order], nbytes[order]
    start = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
    size = np.diff(np.r_[start, b.size])
    rank = np.arange(b.size) - np.repeat(start, size)  # i - 1
    k = np.repeat(size, size)
    before = np.cumsum(x) - x - np.repeat(np.cumsum(x)[start] - x[start], size)
    total = np.bincount(inv, weights=nbytes, minlength=n)[b]
    frac = np.empty(b.size)
    frac[order] = np.where(total > 0, (before + (k - rank) * x) / total, 1.0)
    return frac


@dataclass(frozen=True, eq=False)
class FlowSet:
    """The transfers of a flow-tier exchange: flow ``f`` carries ``nbytes[f] * scale`` bytes
    from ``src[f]`` to ``dst[f]`` (distinct devices, bytes > 0).

    ``barrier``: a collective whose steps need all ranks, such as a ring all-reduce: every
    flow is released once every device is ready, not at its sender's ready time, and the
    op ends on every device when its last flow arrives.
    ``extra_latency_us``: a fixed latency each flow adds to its path's (a ring's steps).
    Dispatch and combine of one layer share the arrays (the combine swaps ``src`` and
    ``dst``), so a program holds one copy of a layer's traffic.
    """

    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    scale: float = 1.0
    barrier: bool = False
    extra_latency_us: float = 0.0
    bundles: Bundles | None = None  # node granularity: traffic between domains, bundled

    @staticmethod
    def from_matrix(m: np.ndarray, scale: float = 1.0) -> FlowSet:
        """The flows of a (D, D) src → dst matrix (the diagonal stays on its device)."""
        mm = np.asarray(m, dtype=np.float64)
        src, dst = np.nonzero(mm)
        off = src != dst
        src, dst = src[off], dst[off]
        return FlowSet(src.astype(np.int64), dst.astype(np.int64), mm[src, dst], scale)

    def reversed(self, scale: float) -> FlowSet:
        """Every transfer in the other direction (a combine after its dispatch); device
        flows only (bundles' reverse paths differ: bundle the reversed traffic instead)."""
        if self.bundles is not None:
            raise ValueError("bundled traffic does not reverse: bundle its transpose")
        return FlowSet(self.dst, self.src, self.nbytes, scale, self.barrier, self.extra_latency_us)

    def rescaled(self, scale: float) -> FlowSet:
        return replace(self, scale=scale)

    @cached_property
    def _by_sender(self) -> KeyIndex:
        return KeyIndex.of(self.src)

    def of_senders(self, devices: np.ndarray) -> np.ndarray:
        """Indices of the flows sent by ``devices`` (sorted ids)."""
        return self._by_sender.rows(devices)
