"""Capacity planning: devices needed for a model, a throughput and a latency target."""
