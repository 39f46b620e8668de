"""Aggregated flows for large clusters: ``network.granularity: node``.

At ``device`` granularity every (src, dst) pair with traffic is a flow: D² flows per
exchange. At ``node`` granularity the traffic between scale-up domains is bundled per
(source node, destination node, path class), with each node's NICs pooled as one port:

* links: the device topology's links (for the scale-up fabric, which keeps one flow per
  device pair), then per node an *out* and an *in* port of the summed capacity of its
  NICs, and per (leaf group, spine) an uplink and a downlink of the summed capacity of the
  group's rail leaves' links to that spine;
* a bundle's path: out port → in port when its member pairs stay on one leaf (same rail,
  same leaf group), else out port → group uplink → spine → group downlink → in port, the
  spine chosen by destination node as the device paths choose it (D-mod-k);
* a bundle's weight is its member count: it takes the max-min share of as many flows;
* it is released once every device of its source node is ready (the node's last one), and
  it touches the devices that send or receive bytes in it: each of them is done with the
  exchange only once the bundle has arrived.

What this loses against device flows: a hot device's own NIC limit (pooled with its
node's), the spread of release times inside a node, and the spread of end times among a
bundle's members. ``benchmarks/flow_granularity.py`` measures the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moesim.sim.flows import KeyIndex, _gather_index, _sub_paths
from moesim.topology.build import Routes, Topology

__all__ = ["Bundles", "NodeLinks", "bundle_traffic", "node_links"]


@dataclass(frozen=True)
class NodeLinks:
    """The device topology's links followed by the node-level ones."""

    capacity_gbps: np.ndarray
    latency_us: np.ndarray
    out_port: np.ndarray  # (nodes,) link index
    in_port: np.ndarray  # (nodes,)
    group_up: np.ndarray  # (groups, spines) link index; empty without spines
    group_down: np.ndarray
    devices_per_node: int
    nodes_per_leaf: int


def node_links(topo: Topology) -> NodeLinks:
    """Node ports and group uplinks built on ``topo`` (a switched kind)."""
    if topo.kind.startswith("torus"):
        raise ValueError("node granularity needs a switched fabric (tori keep device flows)")
    t = topo.tables
    g = topo.devices_per_node
    nodes = -(-topo.num_devices // g)
    node = np.arange(topo.num_devices) // g
    cap = np.asarray(topo.capacity_gbps, dtype=np.float64)
    lat = np.asarray(topo.latency_us, dtype=np.float64)
    out_cap = np.bincount(node, weights=cap[t["nic_up"]], minlength=nodes)
    in_cap = np.bincount(node, weights=cap[t["nic_down"]], minlength=nodes)
    base = cap.size
    out_port = base + np.arange(nodes)
    in_port = base + nodes + np.arange(nodes)
    caps = [cap, out_cap, in_cap]
    lats = [lat, np.full(nodes, lat[t["nic_up"]].max()), np.full(nodes, lat[t["nic_down"]].max())]
    groups = int(t["groups"][0])
    leaf_up, leaf_down = t["leaf_up"], t["leaf_down"]  # (rails * groups, spines)
    spines = leaf_up.shape[1]
    has_spine = topo.num_devices > topo.domain_size
    group_up = np.zeros((0, 0), dtype=np.int64)
    group_down = np.zeros((0, 0), dtype=np.int64)
    if has_spine:
        # leaf (rail, group) is row rail * groups + group: sum over the rails of each group
        rows = np.arange(g)[:, None] * groups + np.arange(groups)[None, :]  # (rails, groups)
        up_cap = cap[leaf_up[rows]].sum(axis=0)  # (groups, spines)
        down_cap = cap[leaf_down[rows]].sum(axis=0)
        start = base + 2 * nodes
        group_up = start + np.arange(groups * spines).reshape(groups, spines)
        group_down = group_up + groups * spines
        caps += [up_cap.ravel(), down_cap.ravel()]
        lats += [lat[leaf_up[rows]].max(axis=0).ravel(), lat[leaf_down[rows]].max(axis=0).ravel()]
    return NodeLinks(
        capacity_gbps=np.concatenate(caps),
        latency_us=np.concatenate(lats),
        out_port=out_port,
        in_port=in_port,
        group_up=group_up,
        group_down=group_down,
        devices_per_node=g,
        nodes_per_leaf=int(t["nodes_per_leaf"][0]),
    )


@dataclass(frozen=True, eq=False)
class Bundles:
    """Node-pair bundles of one exchange: (B,) source node, bytes, weight (member pairs),
    their paths on :class:`NodeLinks`, and the devices each touches (CSR)."""

    src_node: np.ndarray
    nbytes: np.ndarray
    weight: np.ndarray
    routes: Routes
    touch_ptr: np.ndarray
    touch_dev: np.ndarray
    touch_frac: np.ndarray  # share of the bundle's time each touched device is busy in it
    devices_per_node: int

    @cached_property
    def _by_node(self) -> KeyIndex:
        return KeyIndex.of(self.src_node)

    def of_nodes(self, nodes: np.ndarray) -> np.ndarray:
        """Indices of the bundles leaving ``nodes`` (sorted ids)."""
        return self._by_node.rows(nodes)

    def touched(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The devices bundles ``b`` touch, one entry per (bundle, device), and the share of
        the bundle's time each is busy in it."""
        at = _gather_index(self.touch_ptr, b)
        return self.touch_dev[at], self.touch_frac[at]

    def sub_routes(self, b: np.ndarray) -> Routes:
        ptr, links = _sub_paths(self.routes.indptr, self.routes.links, b)
        return Routes(ptr, links)


def bundle_traffic(m: np.ndarray, topo: Topology, nl: NodeLinks) -> tuple[np.ndarray, Bundles]:
    """Split the (D, D) byte matrix ``m``: returns the matrix of the pairs inside a scale-up
    domain (device flows) and the bundles of every other pair.

    A bundle joins the pairs from one node to one device (or from one device to one node):
    the side whose devices move the most even bytes (max / mean of bytes sent against
    received, over devices) is pooled into node ports, the other keeps each device's own
    NIC, so a hot receiver (a dispatch onto a popular expert) or a hot sender (its
    combine) stays limited by its NIC."""
    d = m.shape[0]
    g = nl.devices_per_node
    dom = np.arange(d) // topo.domain_size
    mm = np.asarray(m, dtype=np.float64)
    src, dst = np.nonzero(mm)
    cross = dom[src] != dom[dst]
    inside = mm.copy()
    inside[src[cross], dst[cross]] = 0.0
    src, dst = src[cross], dst[cross]
    nbytes = mm[src, dst]
    sent = np.bincount(src, weights=nbytes, minlength=d)
    recv = np.bincount(dst, weights=nbytes, minlength=d)

    def skew(x: np.ndarray) -> float:
        return float(x.max() / x.mean()) if x.size and x.mean() > 0 else 1.0

    pool_senders = skew(sent) <= skew(recv)
    ns, nt = src // g, dst // g
    per_leaf = nl.nodes_per_leaf
    direct = (src % g == dst % g) & (ns // per_leaf == nt // per_leaf)
    if nl.group_up.size == 0:
        direct[:] = True
    # a bundle: (pooled node, own device, path class)
    a, b = (ns, dst) if pool_senders else (src, nt)
    key = (a.astype(np.int64) * d + b) * 2 + (~direct)
    uniq, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    u_a, u_b = (uniq // 2) // d, (uniq // 2) % d
    b_spine = (uniq % 2).astype(bool)
    if pool_senders:  # node -> device
        first, last = nl.out_port[u_a], topo.tables["nic_down"][u_b]
        b_src, b_dst = u_a, u_b // g
    else:  # device -> node
        first, last = topo.tables["nic_up"][u_a], nl.in_port[u_b]
        b_src, b_dst = u_a // g, u_b
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
    if sp.size:
        # spines: the pooled side's leaves pooled over the rails, the device side's own
        # rail leaf (it carries that device's bytes, and its rail's others, in any case)
        h = b_dst[sp] % nl.group_up.shape[1]
        groups = nl.group_up.shape[0]
        grp_s, grp_d = b_src[sp] // per_leaf, b_dst[sp] // per_leaf
        if pool_senders:
            links[start[sp] + 1] = nl.group_up[grp_s, h]
            rail = u_b[sp] % g
            links[start[sp] + 2] = topo.tables["leaf_down"][rail * groups + grp_d, h]
        else:
            rail = u_a[sp] % g
            links[start[sp] + 1] = topo.tables["leaf_up"][rail * groups + grp_s, h]
            links[start[sp] + 2] = nl.group_down[grp_d, h]
        links[start[sp] + 3] = last[sp]
    # the devices each bundle touches: its members' senders and receivers, each with the
    # share of the bundle's time it is busy in it (the bundle's own device: all of it)
    pooled = src if pool_senders else dst
    frac = _member_fractions(inv, nbytes, uniq.size)
    own = dst if pool_senders else src
    touch = np.concatenate((inv * d + pooled, inv * d + own))
    share = np.concatenate((frac, np.ones(src.size)))
    order = np.lexsort((-share, touch))  # per (bundle, device) the largest share first
    touch, share = touch[order], share[order]
    first = np.r_[True, touch[1:] != touch[:-1]]
    pairs, touch_frac = touch[first], share[first]
    touch_b, touch_dev = pairs // d, pairs % d
    touch_ptr = np.zeros(uniq.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(touch_b, minlength=uniq.size), out=touch_ptr[1:])
    bundles = Bundles(
        src_node=(u_a if pool_senders else u_a // g).astype(np.int64),
        nbytes=b_bytes,
        weight=weight,
        routes=Routes(ptr, links),
        touch_ptr=touch_ptr,
        touch_dev=touch_dev.astype(np.int64),
        touch_frac=touch_frac,
        devices_per_node=g,
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
