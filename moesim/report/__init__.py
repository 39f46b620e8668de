"""Outputs of a simulation: metrics table, Chrome-trace timeline, Markdown and HTML reports.

``write_outputs`` is imported on first use, so that the command line, which imports
:mod:`moesim.report.commands` to register ``moesim report``, starts without the report
writers (pandas, the simulator).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moesim.report.write import write_outputs

__all__ = ["write_outputs"]


def __getattr__(name: str) -> Any:
    if name == "write_outputs":
        from moesim.report.write import write_outputs

        return write_outputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
