"""The one way the command line makes a rich console, and its progress bars.

In a terminal, rich fits tables and text to its width. Into a pipe or a file there is no
width to fit: tables take the width their contents need, so no name or figure is cut to
``…``, whatever the reader's terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

__all__ = [
    "UNBOUNDED_WIDTH",
    "Advance",
    "make_console",
    "print_json",
    "progress_bar",
    "status",
]

#: the width a console writes to a pipe or file with: tables size to their contents
UNBOUNDED_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr), without highlighting; long lines are not wrapped."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = UNBOUNDED_WIDTH
    return console


def print_json(data: Any) -> None:
    """A command's ``--json`` answer: ``data`` as indented JSON, the only thing on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


#: the signature of a progress callback: ``advance(n)`` after ``n`` more units are done
#: (keyword fields, where the bar shows any, update them: ``advance(1, failed=2)``)
Advance = Callable[..., None]


@contextmanager
def progress_bar(
    label: str, total: int, unit: str, *, completed: int = 0, **fields: Any
) -> Iterator[Advance]:
    """A progress bar on stderr for a job that may take seconds: ``label``, done/``total``
    ``unit`` (a rich format string that may name ``fields``, e.g. ``"cases,
    {task.fields[failed]} failed"``), elapsed time and ETA; yields ``advance(n, **fields)``.
    Drawn only where stderr is a terminal: into a pipe or a file it writes nothing, so
    outputs stay clean."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = make_console(stderr=True)
    with Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=total, completed=completed, **fields)

        def advance(n: int, **changed: Any) -> None:
            progress.update(task, advance=n, **changed)

        yield advance


@contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner with ``text`` on stderr while a step of unknown length runs; drawn only
    where stderr is a terminal."""
    console = make_console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(text):
        yield
