"""The one way the command line makes a rich console.

In a terminal, rich fits tables and text to its width. Into a pipe or a file there is no
width to fit: tables take the width their contents need, so no name or figure is cut to
``…``, whatever the reader's terminal.
"""

from __future__ import annotations

from rich.console import Console

__all__ = ["UNBOUNDED_WIDTH", "make_console"]

#: the width a console writes to a pipe or file with: tables size to their contents
UNBOUNDED_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr), without highlighting; long lines are not wrapped."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = UNBOUNDED_WIDTH
    return console
