"""Expert placement: which logical experts (and replicas) live on which device."""

from moesim.placement.base import Placement, contiguous

__all__ = ["Placement", "contiguous"]
