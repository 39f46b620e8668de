"""Routing traces: the Parquet trace store, importers and synthetic routing.

The store's names are imported on first use, so that the command line, which imports
:mod:`moesim.traces.commands` to register ``moesim trace``, starts without pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moesim.traces.store import RoutingTrace, read_trace, write_trace

__all__ = ["RoutingTrace", "read_trace", "write_trace"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moesim.traces import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
