"""The one error type for bad user input, rendered as a single line by the CLI."""

from __future__ import annotations

from pathlib import Path

__all__ = ["InputError"]


class InputError(Exception):
    """Bad user input: names the file, the field and the offending value.

    The CLI prints ``str(err)`` on one line and exits with status 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        value: object = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field
        self.value = value
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.field:
            parts.append(f"field '{self.field}'")
        if self.value is not None:
            text = repr(self.value)
            parts.append(f"value {text[:80] + '...' if len(text) > 80 else text}")
        where = ": ".join(parts)
        msg = " ".join(self.message.split())  # always one line
        return f"{where}: {msg}" if where else msg
