"""Expert placement: which logical experts (and replicas) live on which device."""

from moesim.placement.base import Placement, contiguous
from moesim.placement.planners import STRATEGIES, plan

__all__ = ["STRATEGIES", "Placement", "contiguous", "plan"]
