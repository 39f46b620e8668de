"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from moesim.errors import InputError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "normal_permissions",
]


def check_writable(path: str | Path, field: str = "out") -> None:
    """Before any work: raise :class:`InputError` when ``path`` (a file or folder to be
    written) could not be created or replaced: its nearest existing ancestor is a file, or
    a folder this process may not write (no permission, a read-only file system)."""
    path = Path(path).absolute()
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError("its folder is a file", file=path, field=field, value=str(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(
            "cannot write there (no permission or a read-only file system)",
            file=path,
            field=field,
            value=str(probe),
        )


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
    except OSError as exc:  # a full disk, a permission lost meanwhile: the old file stays
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"cannot write there ({exc.strerror or exc})", file=path) from None
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
