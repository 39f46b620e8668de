"""The dense-gradient all-reduce of a training step: Megatron-Core's buckets, overlapped
with the backward pass, each a ring over every device."""

from __future__ import annotations

import numpy as np

from moesim.costs.work import BYTES_PER_ELEMENT
from moesim.hardware import HardwareProfile
from moesim.sim.cluster import ClusterSpec
from moesim.sim.engine import Exchange, Op
from moesim.sim.transfers import FlowSet

__all__ = ["allreduce_time_us", "bucket_params", "gradient_allreduce", "ring_order"]


def _ring_tier(hw: HardwareProfile, cluster: ClusterSpec) -> tuple[float, float]:
    """(GB/s, µs per hop) of the ring's slowest tier: scale-up inside one domain, else the
    NICs (the slowest one, when a NIC is degraded)."""
    if cluster.domain_size >= cluster.num_devices:
        return hw.scale_up.bandwidth_gbps * hw.efficiency.scale_up, hw.scale_up.latency_us
    bw = hw.scale_out.bandwidth_gbps * hw.efficiency.scale_out
    nic = cluster.topology.nic_scale
    if nic is not None:
        bw *= float(nic.min())
    return bw, hw.scale_out.latency_us


def allreduce_time_us(nbytes: float, hw: HardwareProfile, cluster: ClusterSpec) -> float:
    """Ring all-reduce: ``2 (D-1)/D * bytes`` over the slowest tier, plus 2 (D-1) latencies."""
    d = cluster.num_devices
    if d == 1 or nbytes == 0:
        return 0.0
    bw, lat = _ring_tier(hw, cluster)
    return 2 * (d - 1) / d * nbytes / (bw * 1e3) + 2 * (d - 1) * lat


def ring_order(d: int, devices_per_node: int) -> np.ndarray:
    """The ring's device order: through each node's devices, forward in even nodes and
    backward in odd ones, so that a hop between nodes stays on one rail (node 0's last
    device to node 1's last, node 1's first to node 2's first), as NCCL's rings on
    rail-optimised clusters do."""
    g = devices_per_node
    idx = np.arange(d)
    node, pos = idx // g, idx % g
    return np.where(node % 2 == 1, node * g + np.minimum(g, d - node * g) - 1 - pos, idx)


#: Megatron-Core's default gradient bucket, in parameters: max(40 M, 1 M x data-parallel
#: size) (``DistributedDataParallelConfig.bucket_size``, "larger DP sizes need larger
#: buckets to ensure collectives do not become latency-bound")
def bucket_params(dp_size: int) -> int:
    return max(40_000_000, 1_000_000 * dp_size)


GRAD_BYTES = BYTES_PER_ELEMENT["bf16"]  # gradients reduced in bf16 (Megatron's default)


def gradient_allreduce(
    ready: list[tuple[int, float]], hw: HardwareProfile, cluster: ClusterSpec
) -> list[Op]:
    """The dense-gradient all-reduce, bucketed and overlapped with the backward pass as
    Megatron-Core does with ``overlap_grad_reduce``: gradients fill buckets of
    :func:`bucket_params` parameters in the order the backward pass produces them
    (``ready``: the op that finishes a group of gradients, and their parameter count), and
    each full bucket is all-reduced on a stream of its own as soon as the op that fills it
    is done; the last, partial bucket once the backward pass is.

    A ring over every device (:func:`allreduce_time_us` in closed form; in the flow tier a
    ring of flows in :func:`ring_order`, each device sending ``2 (D-1)/D`` of the bucket to
    the next, released once every device is ready) that shares links with the all-to-alls
    still in flight.
    """
    d = cluster.num_devices
    if d == 1:
        return []
    cap = bucket_params(d)
    ops: list[Op] = []
    filled = 0.0
    for n, (op_index, params) in enumerate(ready):
        filled += params
        last = n == len(ready) - 1
        if filled <= 0 or (filled < cap and not last):
            continue
        nbytes = filled * GRAD_BYTES
        filled = 0.0
        ar = allreduce_time_us(nbytes, hw, cluster)
        flows = None
        if cluster.network == "flow":
            ring = ring_order(d, cluster.devices_per_node)
            _, lat = _ring_tier(hw, cluster)
            flows = FlowSet(
                ring,
                np.roll(ring, -1),
                np.full(d, 2 * (d - 1) / d * nbytes),
                barrier=True,
                extra_latency_us=(2 * (d - 1) - 1) * lat,
            )
        ops.append(
            Exchange(
                f"gradient all-reduce {len(ops)}",  # its phase too: one row per bucket
                "allreduce",
                np.zeros(d) if flows is not None else np.full(d, ar),
                None,
                pass_="backward",
                after=(op_index,),
                stream="grad-allreduce",
                flows=flows,
                port_limited_us=np.full(d, ar) if flows is not None else None,
                phase=f"gradient all-reduce {len(ops)}",
            )
        )
    return ops
