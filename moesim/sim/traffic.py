"""Token copies between devices for dispatch and combine, under a de-duplication policy.

A token whose top-k experts live on several devices is sent:

* ``none``   — once per (token, expert): every assignment is its own copy;
* ``device`` — once per (token, device): a device hosting two of the token's experts
  receives it once;
* ``node``   — once per (token, node) across nodes, to the GPU of the sender's rail in
  the destination node, which forwards it over NVLink to every other device of that node
  that needs it (DeepEP's internode dispatch); devices of the sender's own node get it
  directly, once each.

Combine moves the results back along the reverse pattern (the transpose). Everything is
vectorised over assignments.
"""

from __future__ import annotations

import numpy as np

from moesim.dispatchers import Dedup

__all__ = ["copy_matrix", "traffic_matrix"]


def traffic_matrix(src: np.ndarray, dst: np.ndarray, num_devices: int) -> np.ndarray:
    """(D, D) int64 count of items sent from device ``src`` to device ``dst``."""
    flat = np.multiply(src, num_devices, dtype=np.int64)
    flat += dst
    return np.bincount(flat, minlength=num_devices * num_devices).reshape(num_devices, num_devices)


def copy_matrix(
    dest: np.ndarray,
    origin: np.ndarray,
    num_devices: int,
    devices_per_node: int,
    dedup: Dedup = "none",
) -> np.ndarray:
    """(D, D) int64 number of token copies each device sends to each device in a dispatch.

    Args:
        dest: (T, K) device serving each of token ``t``'s assignments, -1 where there is
        none (dropped, or padding); origin: (T,) device token ``t`` lives on. The
        diagonal counts copies that stay on their device.

    A token's copies are told apart within its own row: its K destinations sorted, the
    first of each device (one copy per (token, device)) and of each node (one RDMA copy
    per (token, node)) are those that differ from their left neighbour. No sort runs
    across tokens; every other step is a pass over the flat (T*K,) assignments, and the
    copies are counted by ``bincount`` of ``src * D + dst`` keys (a masked entry's key is
    D * D, a spare bin).
    """
    d, g = num_devices, devices_per_node
    dest = np.asarray(dest, dtype=np.int32)
    origin = np.asarray(origin, dtype=np.int32)
    k = dest.shape[1]
    src = np.repeat(origin, k)  # (T*K,) the sender of each assignment, row after row
    if dedup == "none":
        flat = dest.reshape(-1)
        return _pair_counts(src, flat, flat >= 0, d)
    s = np.sort(dest, axis=1).reshape(-1)
    new = _row_firsts(s, k)  # the first of each device in its token's row
    new &= s >= 0
    if dedup == "device":
        return _pair_counts(src, s, new, d)
    node = s // g  # ascending along a row too; -1 (none) stays below every node
    same_node = node == src // g
    relay = node
    relay *= g
    relay += src % g  # sender's rail GPU in the destination node
    # from the sender: one copy to each device of its own node that needs the token, and
    # one RDMA copy per other node (the node's first device in the row), to the relay
    direct = _row_firsts(relay, k)
    direct |= same_node
    direct &= new
    out = _pair_counts(src, np.where(same_node, s, relay), direct, d)
    fwd = relay != s  # NVLink forwards inside the destination node
    fwd &= new
    fwd &= ~same_node
    out += _pair_counts(relay, s, fwd, d)
    return out


def _pair_counts(
    src: np.ndarray, dst: np.ndarray, mask: np.ndarray, num_devices: int
) -> np.ndarray:
    """(D, D) int64 count of the (``src``, ``dst``) pairs where ``mask`` holds."""
    n = num_devices * num_devices
    key = np.multiply(src, num_devices, dtype=np.int64)
    key += dst
    np.copyto(key, n, where=~mask)  # the spare bin, dropped below
    return np.bincount(key, minlength=n + 1)[:n].reshape(num_devices, num_devices)


def _row_firsts(flat: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the entries of ``flat`` ((T*K,), rows of K one after another, each
    ascending) that open a row or differ from their left neighbour: the first of each
    distinct value within its row. Compared as one flat array (a (T, K-1) comparison runs
    an inner loop per row)."""
    out = np.empty(flat.size, dtype=bool)
    out[:1] = True
    np.not_equal(flat[1:], flat[:-1], out=out[1:])
    out[::k] = True
    return out
