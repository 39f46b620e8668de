"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from moesim.errors import InputError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "normal_permissions"]


def normal_permissions(path: Path) -> None:
    """Give a file (0666) or folder (0777) made by ``tempfile`` the permissions the umask
    would have given it (``mkstemp``/``mkdtemp`` create them private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; on error nothing changes.
    A ``path`` that is a folder, or under a file, is an :class:`InputError`."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; expected a file name", file=path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise InputError("its folder is a file", file=path) from None
    except OSError as exc:
        raise InputError(f"cannot write there ({exc.strerror})", file=path) from None
    os.close(fd)
    try:
        write(Path(tmp))
        normal_permissions(Path(tmp))  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(p: Path) -> None:
        p.write_bytes(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
