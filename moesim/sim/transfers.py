"""The flow tier's transfers: device flows, and bundles for large clusters.

:class:`FlowSet` is what a flow-tier exchange hands the engine: a flow per (src, dst)
device pair with traffic, and at ``network.granularity: rail`` or ``node`` the bundles
(:class:`Bundles`) that carry the traffic between scale-up domains.

* ``device``: every (src, dst) pair with traffic is a flow on its own path (D² flows).
* ``rail`` (:func:`rail_traffic`): the path DeepEP's normal kernels take. A device's
  traffic to another node is one bundle over its own rail to that node's device on the
  same rail, which forwards it over the scale-up fabric (device flows inside the node);
  the combine goes the other way round (scale-up fabric first, then the rail). About
  D²/g bundles for nodes of g devices. This is a path, not only an aggregation: with
  ``network.dedup: node`` the traffic already takes it and rail's flows are device flows'
  (only when a combine's flows leave differs); otherwise it moves bytes off the spines
  that device flows cross between rails.
* ``node`` (:func:`node_traffic`): one bundle per (node pair, path class), on ports that
  pool a node's NICs and a leaf group's spine links (:func:`node_links`): about
  (D/g)² bundles. A device hot for its NIC keeps its own NIC: device flows into a hot
  receiver, a bundle per node out of a hot sender.

A bundle weighs its member count (the max-min share of that many flows), goes out when
its release group (its sender; for ``node`` and a rail combine, its source node) is
ready, and keeps each device it touches busy for the share of its time that device's
members would take at equal rates. What aggregation loses against device flows (a cold
receiver's own NIC and rail leaf pooled with its node's and group's, the spread of end
times among a bundle's members, a node's early senders waiting for its last) is measured
by ``benchmarks/flow_granularity.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from moesim.scenario import HOT_DEVICE
from moesim.sim.flows import KeyIndex, _gather_index, _sub_paths
from moesim.topology.build import Routes, Topology

__all__ = ["Bundles", "FlowSet", "NodeLinks", "node_links", "node_traffic", "rail_traffic"]


@dataclass(frozen=True)
class NodeLinks:
    """The device topology's links followed by the node-level ones."""

    capacity_gbps: np.ndarray
    latency_us: np.ndarray
    out_port: np.ndarray  # (nodes,) link index: a node's NICs up, pooled
    in_port: np.ndarray  # (nodes,) link index: a node's NICs down, pooled
    group_up: np.ndarray  # (groups, spines) link index; empty without spines
    group_down: np.ndarray  # (groups, spines) link index; empty without spines
    devices_per_node: int
    nodes_per_leaf: int


def node_links(topo: Topology) -> NodeLinks:
    """Node ports and leaf-group spine links built on ``topo`` (a switched kind): per node an
    *out* and an *in* port of its NICs' summed capacity, per (leaf group, spine) an uplink
    and a downlink of the summed capacity of the group's rail leaves' links to that spine."""
    if topo.kind.startswith("torus"):
        raise ValueError("node granularity needs a switched fabric (tori keep device flows)")
    t = topo.tables
    g = topo.devices_per_node
    nodes = -(-topo.num_devices // g)
    node = np.arange(topo.num_devices) // g
    cap = np.asarray(topo.capacity_gbps, dtype=np.float64)
    lat = np.asarray(topo.latency_us, dtype=np.float64)
    out_port = cap.size + np.arange(nodes)
    in_port = out_port + nodes
    caps: list[np.ndarray] = [cap]
    lats: list[np.ndarray] = [lat]
    for nic in (t["nic_up"], t["nic_down"]):
        caps.append(np.bincount(node, weights=cap[nic], minlength=nodes))
        lats.append(np.full(nodes, lat[nic].max()))
    groups = int(t["groups"][0])
    group_up = group_down = np.zeros((0, 0), dtype=np.int64)
    if topo.num_devices > topo.domain_size:  # spines
        # leaf (rail, group) is row rail * groups + group: sum over the rails of each group
        rows = np.arange(g)[:, None] * groups + np.arange(groups)[None, :]  # (rails, groups)
        spines = t["leaf_up"].shape[1]
        first = cap.size + 2 * nodes
        group_up = first + np.arange(groups * spines).reshape(groups, spines)
        group_down = group_up + groups * spines
        for leaf in (t["leaf_up"], t["leaf_down"]):
            caps.append(cap[leaf[rows]].sum(axis=0).ravel())
            lats.append(lat[leaf[rows]].max(axis=0).ravel())
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
    """Bundles of one exchange: B weighted flows, each carrying the traffic of several
    (sender, receiver) device pairs, its *members*.

    Bundle ``b`` goes out when every device of its release group is ready: devices
    ``group[b] * group_size`` to ``group[b] * group_size + group_size - 1`` (a sender, or a
    node). It carries ``nbytes[b]`` on its path in ``routes`` and takes the max-min share of
    ``weight[b]`` flows (its member count). The devices it touches (CSR ``touch_*``), on
    its sending (``touch_out``) or receiving side, are each busy with it until
    ``touch_frac`` of its time, from its release to its arrival, has passed: when their
    members would have ended, were the members to drain at equal rates
    (:func:`_block_fractions`)."""

    group: np.ndarray
    group_size: int
    nbytes: np.ndarray
    weight: np.ndarray
    routes: Routes
    touch_ptr: np.ndarray
    touch_dev: np.ndarray
    touch_frac: np.ndarray
    touch_out: np.ndarray

    @cached_property
    def _by_group(self) -> KeyIndex:
        return KeyIndex.of(self.group)

    def of_groups(self, groups: np.ndarray) -> np.ndarray:
        """Indices of the bundles of release groups ``groups`` (sorted ids)."""
        return self._by_group.rows(groups)

    def touched(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The devices bundles ``b`` touch, one entry per (bundle, device): the device, the
        share of the bundle's time it is busy in it, and whether it sends."""
        at = _gather_index(self.touch_ptr, b)
        return self.touch_dev[at], self.touch_frac[at], self.touch_out[at]

    def sub_routes(self, b: np.ndarray) -> Routes:
        ptr, links = _sub_paths(self.routes.indptr, self.routes.links, b)
        return Routes(ptr, links)


def _block_fractions(x: np.ndarray) -> np.ndarray:
    """(B, k) member bytes of B bundles (0: no such member) → when each member would end,
    as a share of its bundle's time, were the members to drain at equal rates (a max-min
    share each): with a bundle's sizes sorted x1 <= ... <= xn summing to S, member i ends at
    (x1 + ... + x(i-1) + (n - i + 1) xi) / S; 0 for absent members."""
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    n = (x > 0).sum(axis=1, keepdims=True)
    rank = np.arange(x.shape[1])[None, :] - (x.shape[1] - n)  # i - 1 among the present
    before = np.cumsum(xs, axis=1) - xs
    total = xs.sum(axis=1, keepdims=True)
    f = np.where(xs > 0, (before + (n - rank) * xs) / np.where(total > 0, total, 1.0), 0.0)
    out = np.empty_like(f)
    np.put_along_axis(out, order, f, axis=1)
    return out


def _bundles(
    group: np.ndarray,
    group_size: int,
    routes: Routes,
    x: np.ndarray,
    send_dev: np.ndarray,
    recv_dev: np.ndarray,
    pin: tuple[str, np.ndarray] | None = None,
) -> Bundles:
    """Bundles from their members' bytes ``x`` (B, a, c): member (i, j) of bundle b goes from
    ``send_dev[b, i]`` to ``recv_dev[b, j]``. ``pin``: ("send" or "recv", (B,) column) a
    device of each bundle busy to its end whatever its own bytes (a relay)."""
    b, a, c = x.shape
    frac = _block_fractions(x.reshape(b, a * c)).reshape(b, a, c)
    share = np.concatenate((frac.max(axis=2), frac.max(axis=1)), axis=1)  # (B, a + c)
    if pin is not None:
        side, col = pin
        share[np.arange(b), col + (a if side == "recv" else 0)] = 1.0
    dev = np.concatenate((send_dev, recv_dev), axis=1)
    out = np.zeros(share.shape, dtype=bool)
    out[:, :a] = True
    on = share > 0
    ptr = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(on.sum(axis=1), out=ptr[1:])
    return Bundles(
        group=group.astype(np.int64),
        group_size=group_size,
        nbytes=x.sum(axis=(1, 2)),
        weight=(x > 0).sum(axis=(1, 2)).astype(np.float64),
        routes=routes,
        touch_ptr=ptr,
        touch_dev=dev[on].astype(np.int64),
        touch_frac=share[on],
        touch_out=out[on],
    )


def _split_domains(m: np.ndarray, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """``m`` as (pairs inside a scale-up domain, pairs between domains)."""
    dom = np.arange(m.shape[0]) // topo.domain_size
    cross = dom[:, None] != dom[None, :]
    mm = np.asarray(m, dtype=np.float64)
    return np.where(cross, 0.0, mm), np.where(cross, mm, 0.0)


def rail_traffic(
    m: np.ndarray, topo: Topology, *, combine: bool = False
) -> tuple[np.ndarray, Bundles]:
    """``granularity: rail``: the (D, D) byte matrix ``m`` on the path DeepEP's normal
    kernels take between scale-up domains. Returns the matrix of device flows (pairs inside
    a domain, plus the forwarding over the scale-up fabric) and the bundles.

    * dispatch: what a device sends to another node goes as one bundle over its own rail to
      that node's device on the same rail (the *relay*), which forwards each receiver's
      bytes over the scale-up fabric; the bundle goes out when its sender is ready and
      touches its sender, the relay (busy to its end) and the receivers;
    * ``combine``: the reverse: a node's devices send what they owe one device to their
      node's device on that device's rail over the scale-up fabric, which sends it as one
      bundle over that rail; the bundle goes out once every device of the node is ready.

    With ``network.dedup: node`` the traffic is already relayed (each sender's bytes to a
    node go to the relay): every bundle has one member, the device flow of that pair; only
    the combine's release, with its node, differs from device flows."""
    d, g = m.shape[0], topo.devices_per_node
    n = d // g
    inside, cross = _split_domains(m, topo)
    local = np.arange(g)
    if not combine:
        x = cross.reshape(d, n, g)  # (sender, node, receiver in the node)
        s, node = np.nonzero(x.sum(axis=2))
        xb = x[s, node][:, None, :]
        relay = node * g + s % g
        send, recv = s[:, None], node[:, None] * g + local
        ends, pin, group, size = (s, relay), ("recv", s % g), s, 1
        fwd = (np.repeat(relay, g), recv.ravel())
    else:
        x = cross.reshape(n, g, d).transpose(0, 2, 1)  # (node, receiver, sender in the node)
        node, r = np.nonzero(x.sum(axis=2))
        xb = x[node, r][:, :, None]
        relay = node * g + r % g
        send, recv = node[:, None] * g + local, r[:, None]
        ends, pin, group, size = (relay, r), ("send", r % g), node, g
        fwd = (send.ravel(), np.repeat(relay, g))
    nb = xb.ravel()
    keep = (nb > 0) & (fwd[0] != fwd[1])
    flat = fwd[0][keep] * d + fwd[1][keep]
    inside = inside + np.bincount(flat, weights=nb[keep], minlength=d * d).reshape(d, d)
    routes = topo.routes(*ends)
    return inside, _bundles(group, size, routes, xb, send, recv, pin)


def _hot(nbytes: np.ndarray, nic_gbps: np.ndarray, g: int, hot: float) -> np.ndarray:
    """(D,) devices whose bytes per unit of NIC exceed ``hot`` x their node's mean."""
    load = nbytes / nic_gbps
    return load > hot * np.repeat(load.reshape(-1, g).mean(axis=1), g)


def node_traffic(
    m: np.ndarray, topo: Topology, nl: NodeLinks, hot: float = HOT_DEVICE
) -> tuple[np.ndarray, Bundles]:
    """``granularity: node``: the (D, D) byte matrix ``m`` as one bundle per (node pair,
    path class), on the node's pooled ports (:func:`node_links`). Returns the matrix of the
    pairs kept as device flows and the bundles.

    A bundle's path: the source node's out port, then the destination node's in port for
    the pairs that stay on one leaf (same rail, same leaf group), else the source group's
    pooled uplink to the spine (chosen by destination node, D-mod-k, as device paths choose
    it), the destination group's pooled downlink and the in port. Every bundle goes out
    once every device of its source node is ready. Pairs inside a scale-up domain stay
    device flows.

    A *hot* device (more bytes per unit of NIC, received or sent, than ``hot`` x its
    node's mean: a popular expert's device, which receives its tokens in the dispatch and
    sends them back in the combine; a degraded NIC) keeps its own links. Pairs into a hot
    receiver stay device flows, each released when its sender is ready (a bundle would
    hold every sender of a node until the node's last). What a hot sender sends a node is
    a bundle of its own that starts on its NIC (and rail leaf uplink), released with its
    node (a hot sender is mostly its node's last). So the NIC that limits a hot device
    still limits it."""
    d, g = m.shape[0], nl.devices_per_node
    n = d // g
    t = topo.tables
    inside, cross = _split_domains(m, topo)
    hot_in = _hot(cross.sum(axis=0), topo.capacity_gbps[t["nic_down"]], g, hot)
    inside[:, hot_in] += cross[:, hot_in]
    cross[:, hot_in] = 0.0
    hot_out = _hot(cross.sum(axis=1), topo.capacity_gbps[t["nic_up"]], g, hot)
    x4 = cross.reshape(n, g, n, g).transpose(0, 2, 1, 3)  # (src node, dst node, rail, rail)
    grp = np.arange(n) // nl.nodes_per_leaf
    groups = int(t["groups"][0])
    direct = (grp[:, None] == grp[None, :])[:, :, None, None] & np.eye(g, dtype=bool)
    ho = hot_out.reshape(n, 1, g, 1)
    parts = []  # (src node, dst node, via spine, hot sender's rail or -1, (B, g, g) bytes)
    for via_spine in (False, True):
        cls = direct ^ via_spine
        xc = np.where(cls & ~ho, x4, 0.0)
        sn, dn = np.nonzero(xc.sum(axis=(2, 3)))
        parts.append((sn, dn, via_spine, np.full(sn.size, -1), xc[sn, dn]))
        xh = np.where(cls & ho, x4, 0.0)
        sn, dn, r = np.nonzero(xh.sum(axis=3))
        block = np.zeros((sn.size, g, g))
        block[np.arange(sn.size), r, :] = xh[sn, dn, r, :]
        parts.append((sn, dn, via_spine, r, block))
    sn, dn, r, xb = (np.concatenate([p[i] for p in parts]) for i in (0, 1, 3, 4))
    spine = np.concatenate([np.full(p[0].size, p[2]) for p in parts])
    from_hot = r >= 0
    hops = np.where(spine, 4, 2)
    ptr = np.zeros(sn.size + 1, dtype=np.int64)
    np.cumsum(hops, out=ptr[1:])
    links = np.empty(int(ptr[-1]), dtype=np.int64)
    start = ptr[:-1]
    links[start] = np.where(from_hot, t["nic_up"][sn * g + np.maximum(r, 0)], nl.out_port[sn])
    links[ptr[1:] - 1] = nl.in_port[dn]
    if spine.any():
        h = topo.spine_of(dn[spine])
        rs, gs, gd = np.maximum(r[spine], 0), grp[sn[spine]], grp[dn[spine]]
        own = t["leaf_up"][rs * groups + gs, h]
        links[start[spine] + 1] = np.where(from_hot[spine], own, nl.group_up[gs, h])
        links[start[spine] + 2] = nl.group_down[gd, h]
    local = np.arange(g)
    send, recv = sn[:, None] * g + local, dn[:, None] * g + local
    return inside, _bundles(sn, g, Routes(ptr, links), xb, send, recv)


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
