"""Replica choice: which physical copy of an expert serves an assignment.

One implementation, at two levels, that every consumer calls (the simulator's token- and
count-level routing, the placement metrics, ``moesim a2a``):

* :func:`choose_replicas` — per assignment (token level): the serving device of each
  (token, expert) pair;
* :func:`slot_shares` — per (source device, physical slot) (count level): the share of a
  device's assignments to an expert that each of the expert's slots serves; the expected
  shares of the token-level choice.

Policies (``replica_choice`` in a scenario):

- ``nearest``: the token's own device if it hosts the expert; else the expert's replicas
  on the token's node, shared in turn (token ``t`` takes the node's replica ``t mod n``);
  else all replicas, shared the same way.
- ``round-robin``: the j-th assignment of an expert in the batch (in order) goes to its
  replica ``j mod replicas`` (even split, blind to locality).
- ``least-loaded``: replicas on the token's node if it has any, else all replicas; within
  those, the split of the batch's assignments that makes the largest device load as small
  as possible (locality first, then balance).
- ``batch-split``: any replica: the split that makes the batch's largest device load as
  small as the placement allows (exact balance per batch, blind to locality).

A device may host one expert twice (DeepSeek's EPLB does so): the expert's replica table
then lists that device twice, and the device serves both replicas' shares.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

__all__ = [
    "REPLICA_CHOICES",
    "ReplicaChoice",
    "choose_replicas",
    "copies_per_device",
    "rank_in_group",
    "slot_shares",
]

ReplicaChoice = Literal["nearest", "round-robin", "least-loaded", "batch-split"]
REPLICA_CHOICES: tuple[str, ...] = get_args(ReplicaChoice)


def rank_in_group(keys: np.ndarray) -> np.ndarray:
    """Position of each element among equal keys, in array order.

    Keys that fit 16 bits (expert ids) sort with NumPy's stable radix sort (linear).
    """
    small = keys.size and int(keys.min()) >= -(2**15) and int(keys.max()) < 2**15
    k = keys.astype(np.int16) if small else keys
    order = np.argsort(k, kind="stable")
    sk = k[order]
    idx = np.arange(keys.size)
    run_start = np.ones(keys.size, dtype=bool)
    run_start[1:] = sk[1:] != sk[:-1]
    first = np.maximum.accumulate(np.where(run_start, idx, 0))
    pos = np.empty_like(order)
    pos[order] = idx - first
    return pos


def copies_per_device(table: np.ndarray, num_devices: int) -> np.ndarray:
    """(D, E) copies of each expert on each device, from its (E, R) replica table."""
    e = table.shape[0]
    exp = np.repeat(np.arange(e), table.shape[1])
    dev = table.reshape(-1)
    ok = dev >= 0
    flat = np.bincount(dev[ok].astype(np.int64) * e + exp[ok], minlength=num_devices * e)
    return flat.reshape(num_devices, e)


def _nearest_mask(cand: np.ndarray, origin: np.ndarray, devices_per_node: int) -> np.ndarray:
    """(..., R) replicas ``nearest`` may use: on the origin device, else on its node, else
    all. ``cand``: (..., R) replica devices padded with -1; ``origin``: (...,)."""
    valid = cand >= 0
    same_dev = valid & (cand == origin[..., None])
    same_node = valid & (cand // devices_per_node == (origin // devices_per_node)[..., None])
    return np.where(
        same_dev.any(axis=-1, keepdims=True),
        same_dev,
        np.where(same_node.any(axis=-1, keepdims=True), same_node, valid),
    )


def choose_replicas(
    experts: np.ndarray,
    origin: np.ndarray,
    token: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    devices_per_node: int,
    policy: ReplicaChoice = "nearest",
    num_devices: int | None = None,
) -> np.ndarray:
    """Device that serves each assignment, among the replicas of its expert (see the
    module docstring for the policies).

    Args:
        experts: (A,) expert id of each assignment; origin: (A,) token's device;
        token: (A,) token index; table: (E, R) replica devices padded with -1, ascending;
        count: (E,) replicas per expert.
        num_devices: D, needed by the load-aware policies (default: highest device + 1).
    Returns:
        (A,) int32 serving device.
    """
    if table.shape[1] == 1:  # one replica per expert: nothing to choose
        return table[experts, 0].astype(np.int32)
    if policy == "round-robin":
        j = rank_in_group(experts) % count[experts]
        return table[experts, j].astype(np.int32)
    if policy in ("least-loaded", "batch-split"):
        d = int(table.max()) + 1 if num_devices is None else num_devices
        out = table[experts, 0].astype(np.int32)
        multi = np.flatnonzero(count[experts] > 1)
        if not multi.size:
            return out
        groups = _Groups.of(experts[multi], origin[multi], table, devices_per_node, d, policy)
        sizes = np.bincount(groups.inv, minlength=groups.experts.size)
        flow = groups.split(sizes, _fixed_loads(experts, table, count, d))
        # each group's assignments, in order, take its edges' shares in turn
        cum = np.cumsum(flow)
        first = np.searchsorted(groups.edge_group, np.arange(groups.experts.size))
        start = cum[first] - flow[first]  # flow before the group's first edge
        pos = start[groups.inv] + rank_in_group(groups.inv)
        out[multi] = groups.edge_device[np.searchsorted(cum, pos, side="right")]
        return out
    ok = _nearest_mask(table[experts], origin, devices_per_node)  # (A, R)
    n_ok = ok.sum(axis=1)
    pick = token % n_ok  # the pick-th allowed replica, in table order
    col = np.argmax(np.cumsum(ok, axis=1) > pick[:, None], axis=1)
    return table[experts, col].astype(np.int32)


def _fixed_loads(
    experts: np.ndarray, table: np.ndarray, count: np.ndarray, num_devices: int
) -> np.ndarray:
    """(D,) assignments of single-replica experts, which no choice can move."""
    single = count[experts] == 1
    return np.bincount(table[experts[single], 0], minlength=num_devices).astype(np.int64)


class _Groups:
    """Assignments of replicated experts (only those) grouped for the load-aware policies,
    and the (group, device) edges each group may use.

    A group is one expert's assignments (``batch-split``), or one expert's assignments from
    one node that hosts a replica, or from all nodes that host none (``least-loaded``).
    """

    def __init__(
        self,
        experts: np.ndarray,
        inv: np.ndarray,
        edge_group: np.ndarray,
        edge_device: np.ndarray,
        num_devices: int,
    ) -> None:
        self.experts = experts  # (G,) expert of each group
        self.inv = inv  # (A,) group of each assignment
        self.edge_group = edge_group  # (P,) sorted
        self.edge_device = edge_device  # (P,)
        self.num_devices = num_devices

    @classmethod
    def of(
        cls,
        experts: np.ndarray,
        origin: np.ndarray,
        table: np.ndarray,
        devices_per_node: int,
        num_devices: int,
        policy: str,
    ) -> _Groups:
        nodes = -(-num_devices // devices_per_node)
        if policy == "least-loaded":
            rep_node = np.where(table >= 0, table // devices_per_node, -1)  # (E, R)
            tok_node = origin // devices_per_node
            has_local = (rep_node[experts] == tok_node[:, None]).any(axis=1)
            sub = np.where(has_local, tok_node, nodes)  # `nodes`: none on the token's node
        else:
            sub = np.zeros(experts.size, dtype=np.int64)
        key = experts.astype(np.int64) * (nodes + 1) + sub
        uniq, inv = np.unique(key, return_inverse=True)
        ge, gn = uniq // (nodes + 1), uniq % (nodes + 1)
        reps = table[ge]  # (G, R)
        allowed = reps >= 0
        if policy == "least-loaded":
            allowed &= (gn == nodes)[:, None] | (reps // devices_per_node == gn[:, None])
        gi, ri = np.nonzero(allowed)
        # one edge per (group, device), even where a device hosts the expert twice
        edges = np.unique(np.stack([gi, reps[gi, ri]], axis=1), axis=0).reshape(-1, 2)
        return cls(ge, inv, edges[:, 0], edges[:, 1].astype(np.int32), num_devices)

    def split(self, sizes: np.ndarray, base: np.ndarray) -> np.ndarray:
        """(P,) assignments on each edge: the split of the groups' ``sizes`` over their
        allowed devices that makes the largest device load (on top of ``base``) as small as
        possible, found exactly by binary search on that load, each step a max-flow."""
        if not sizes.size:
            return np.zeros(0, dtype=np.int64)
        d = self.num_devices
        total = int(sizes.sum()) + int(base.sum())
        lo = max(int(base.max(initial=0)), -(-total // d))  # no split does better
        nallow = np.bincount(self.edge_group, minlength=sizes.size)
        even = base + np.bincount(  # even split over allowed devices: a feasible bound
            self.edge_device, weights=np.ceil(sizes / nallow)[self.edge_group], minlength=d
        )
        hi = int(even.max())
        best = self._flow(sizes, base, hi)
        while lo < hi:
            mid = (lo + hi) // 2
            flow = self._flow(sizes, base, mid)
            if flow is None:
                lo = mid + 1
            else:
                hi, best = mid, flow
        assert best is not None
        return best

    def _flow(self, sizes: np.ndarray, base: np.ndarray, level: int) -> np.ndarray | None:
        """Assignments per edge so that no device exceeds ``level``, as a max-flow from
        groups to devices; None when impossible."""
        g, d = sizes.size, base.size
        src, sink = g + d, g + d + 1
        big = int(sizes.sum())
        rows = np.concatenate([np.full(g, src), self.edge_group, g + np.arange(d)])
        cols = np.concatenate([np.arange(g), g + self.edge_device, np.full(d, sink)])
        cap = np.concatenate(
            [sizes, np.full(self.edge_group.size, big), np.maximum(level - base, 0)]
        )
        graph = csr_matrix((cap.astype(np.int32), (rows, cols)), shape=(g + d + 2, g + d + 2))
        res = maximum_flow(graph, src, sink)
        if res.flow_value < big:
            return None
        flow = res.flow.tocsr()
        return np.asarray(flow[self.edge_group, g + self.edge_device]).ravel().astype(np.int64)


def slot_shares(
    counts: np.ndarray,
    slots: np.ndarray,
    table: np.ndarray,
    count: np.ndarray,
    devices_per_node: int,
    policy: ReplicaChoice = "nearest",
) -> np.ndarray:
    """(D, C) share of device ``s``'s assignments to slot ``c``'s expert that physical slot
    ``c`` serves (slots numbered device-major, C = D * S): the count-level twin of
    :func:`choose_replicas`.

    ``nearest`` and ``round-robin`` give the expected shares of the token-level choice;
    ``least-loaded`` and ``batch-split`` solve the token level's max-flow on the groups'
    summed counts and share each group's flow over its senders in proportion, so device and
    slot loads equal the token level's while who sends to whom does not (the token level
    fills a group's replicas in token order, so a device's tokens tend to one replica). Over
    the slots of one expert each sender's shares sum to 1.

    Args:
        counts: (D, E) assignments of each device's tokens to each expert (read by the
        load-aware policies only); slots: (D, S) hosted experts; table: (E, R) replica
        devices padded with -1; count: (E,) replicas per expert.
    Returns:
        (D, C) float32.
    """
    d, s = slots.shape
    e = table.shape[0]
    cols = slots.reshape(-1)  # (C,) expert of each slot
    dev_c = np.repeat(np.arange(d), s)  # (C,) device of each slot
    hosts = copies_per_device(table, d)  # (D, E)
    even = (1.0 / count[cols]).astype(np.float32)  # (C,)
    if policy == "round-robin" or table.shape[1] == 1:
        return np.ascontiguousarray(np.broadcast_to(even[None, :], (d, cols.size)))
    src = np.arange(d)
    if policy == "nearest":
        node = src // devices_per_node
        on_node = np.zeros((int(node[-1]) + 1, e), dtype=np.int64)  # (N, E)
        np.add.at(on_node, (node[dev_c], cols), 1)
        near = on_node[node]  # (D, E) copies on each sender's node
        # per (sender, expert): which replicas serve it (0 own, 1 node, 2 all), how many
        cls = np.where(hosts > 0, 0, np.where(near > 0, 1, 2)).astype(np.int8)
        many = np.where(hosts > 0, hosts, np.where(near > 0, near, count[None, :]))
        inv = (1.0 / many).astype(np.float32)
        c_cls, c_inv = cls[:, cols], inv[:, cols]  # (D, C)
        serves = c_cls == 2
        serves |= (c_cls == 1) & (node[dev_c][None, :] == node[:, None])
        serves |= (c_cls == 0) & (dev_c[None, :] == src[:, None])
        c_inv *= serves
        return np.ascontiguousarray(c_inv)  # a column gather comes out column-major
    # load-aware: one "assignment" per (device, expert) pair, weighted by its count
    ps, pe = np.nonzero(counts)
    multi = count[pe] > 1
    out = np.broadcast_to(even[None, :], (d, cols.size)).copy()
    if not multi.any():
        return out
    weight = counts[ps, pe].astype(np.int64)
    groups = _Groups.of(pe[multi], ps[multi], table, devices_per_node, d, policy)
    sizes = np.bincount(groups.inv, weights=weight[multi], minlength=groups.experts.size)
    base = np.bincount(table[pe[~multi], 0], weights=weight[~multi], minlength=d)
    flow = groups.split(sizes.astype(np.int64), base.astype(np.int64))
    gshare = np.zeros((groups.experts.size + 1, d))  # last row: pairs with no group
    gshare[groups.edge_group, groups.edge_device] = flow / sizes[groups.edge_group]
    grp = np.full((d, e), groups.experts.size, dtype=np.int64)  # (D, E) group of each pair
    grp[ps[multi], pe[multi]] = groups.inv
    replicated = count[cols] > 1  # (C,)
    share = gshare[grp[:, cols], dev_c[None, :]] / hosts[dev_c, cols][None, :]
    out[:, replicated] = share[:, replicated]
    return out
