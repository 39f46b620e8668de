"""Command-line options that several commands share."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["ForceOption"]

#: --force of every command that writes an output folder
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Write into an existing folder that is not this command's output: only "
        "moesim's own files there are replaced, every other file is left as it is.",
    ),
]
