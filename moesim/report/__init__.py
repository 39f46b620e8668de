"""Outputs of a simulation: metrics table, Chrome-trace timeline, Markdown and HTML reports."""

from moesim.report.write import write_outputs

__all__ = ["write_outputs"]
