"""Routing traces: the Parquet trace store, importers and synthetic routing."""

from moesim.traces.store import RoutingTrace, read_trace, write_trace

__all__ = ["RoutingTrace", "read_trace", "write_trace"]
