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

from moesim.arrays import unique_sorted
from moesim.dispatchers import Dedup

__all__ = ["copy_matrix", "traffic_matrix"]


def traffic_matrix(src: np.ndarray, dst: np.ndarray, num_devices: int) -> np.ndarray:
    """(D, D) int64 count of items sent from device ``src`` to device ``dst``."""
    flat = src.astype(np.int64) * num_devices + dst
    return np.bincount(flat, minlength=num_devices * num_devices).reshape(num_devices, num_devices)


def copy_matrix(
    token: np.ndarray,
    origin: np.ndarray,
    dest: np.ndarray,
    num_devices: int,
    devices_per_node: int,
    dedup: Dedup = "none",
) -> np.ndarray:
    """(D, D) number of token copies each device sends to each device in a dispatch.

    Args:
        token: (A,) token index of each kept assignment; origin: (A,) device the token
        lives on; dest: (A,) device serving the assignment. The diagonal counts copies
        that stay on their device.
    """
    d, g = num_devices, devices_per_node
    if dedup == "none":
        return traffic_matrix(origin, dest, d)
    key = unique_sorted(token.astype(np.int64) * d + dest)  # one per (token, device)
    tok, dst = key // d, key % d
    src = _origin_of(token, origin, tok)
    if dedup == "device":
        return traffic_matrix(src, dst, d)
    same_node = src // g == dst // g
    out = traffic_matrix(src[same_node], dst[same_node], d)
    far_src, far_dst = src[~same_node], dst[~same_node]
    far_tok = tok[~same_node]
    relay = (far_dst // g) * g + far_src % g  # sender's rail GPU in the destination node
    node_key = unique_sorted(far_tok * d + relay)  # one RDMA copy per (token, node)
    t2, r2 = node_key // d, node_key % d
    out += traffic_matrix(_origin_of(token, origin, t2), r2, d)
    fwd = relay != far_dst  # NVLink forwards inside the destination node
    out += traffic_matrix(relay[fwd], far_dst[fwd], d)
    return out


def _origin_of(token: np.ndarray, origin: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Origin device of the tokens ``which`` (every assignment of a token shares one origin)."""
    n = int(max(token.max(initial=0), which.max(initial=0))) + 1
    table = np.zeros(n, dtype=np.int64)
    table[token] = origin
    return table[which]
