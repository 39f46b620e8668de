"""Balance of a load: DESIGN's **balance ratio**, max / mean; 1.0 is perfect.

moesim reports it under a name that says which load it is taken over:

* ``expert_balance``: assignments routed to each logical expert (E,), before capacity
  (a trace's own balance: ``moesim trace stats`` gives the same figure);
* ``routed_balance``: assignments routed to each device (D,), after placement and replica
  choice, before capacity;
* ``processed_balance``: assignments each device processes, after capacity drops (equal
  to ``routed_balance`` in a dropless run).

EPLB's "balancedness" is the inverse (mean / max).
"""

from __future__ import annotations

import numpy as np

__all__ = ["balance_ratio"]


def balance_ratio(load: np.ndarray) -> float:
    """max / mean of ``load`` (any shape, taken over all entries); 1.0 when it is all zero."""
    load = np.asarray(load)
    mean = float(load.mean()) if load.size else 0.0
    return float(load.max() / mean) if mean > 0 else 1.0
