"""Safe writes of moesim's outputs.

Single files (:func:`atomic_write`): written to a temporary name in the same folder, then
renamed onto the destination.

Output folders (:func:`write_output_folder`, :class:`OutputFolder`): a simulate report, a
report, a capacity plan or a trace is rendered into a hidden temporary folder beside the
destination, then swapped in. A destination that already holds a moesim output of the same
kind is exchanged with the new folder in one step (``renameat2(RENAME_EXCHANGE)`` on Linux;
elsewhere renamed aside, the new folder renamed in) and the old one deleted after, so a
reader sees the old folder or the new one, never a mixture. Each kind is recognised by the files it
writes (no marker file): a folder holding nothing but those files (and moesim's
temporaries) is that kind's output, whichever moesim version wrote it. Any other non-empty
folder is refused before any work unless ``force`` is given; then only the kind's own files
are replaced there, each atomically, and everything else is left as it was.

Temporaries carry the writing process's id (``.NAME.moesim-PID-XXXX.tmp``, ``... .old``);
the next write there removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

from moesim.errors import InputError

__all__ = [
    "KINDS",
    "OutputFolder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_folder",
    "check_writable",
    "clean_stray_temporaries",
    "is_output_of",
    "is_temporary",
    "normal_permissions",
    "write_output_folder",
]

#: every file a simulate run writes (moesim demo adds the same under contiguous/)
RUN_FILES = (
    "metrics.parquet",
    "phases.parquet",
    "layers.parquet",
    "summary.json",
    "timeline.json",
    "summary.md",
    "report.html",
)
REPORT_FILES = ("report.html", "summary.md")
PLAN_FILES = ("plan.json", "evaluations.parquet", "report.html", "summary.md")
SWEEP_FILES = ("sweep.yaml", "sweep.json", "results.parquet", "timings.parquet", *REPORT_FILES)

Kind = Literal["run", "report", "plan", "trace", "sweep"]

#: what each kind of output folder is called in messages
KINDS: dict[str, str] = {
    "run": "simulate output",
    "report": "report",
    "plan": "capacity plan",
    "trace": "trace",
    "sweep": "sweep results",
}

#: kinds whose folders a report may be written into (beside their own files)
_HOSTS: dict[str, tuple[str, ...]] = {"report": ("run", "plan", "sweep")}

_TEMP = re.compile(r"^\..*\.moesim-(?P<pid>\d+)-[A-Za-z0-9_]+\.(?:tmp|old)$")


def _temp_prefix(name: str) -> str:
    return f".{name}.moesim-{os.getpid()}-"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file or folder moesim makes while writing."""
    return _TEMP.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _stray(folder: Path) -> Iterator[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        m = _TEMP.match(p.name)
        if m is not None and not _pid_alive(int(m["pid"])):
            yield p


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stray_temporaries(dest: str | Path) -> None:
    """Remove what writers that are gone left beside ``dest`` or inside it: temporaries
    whose process id is not alive. When ``dest`` itself is missing and such a writer had set
    the previous output aside (killed between the two renames), put that back first."""
    dest = Path(dest)
    parent = dest.parent
    if not dest.exists() and not dest.is_symlink():
        for p in _stray(parent):
            if p.name.startswith(f".{dest.name}.moesim-") and p.name.endswith(".old"):
                inner = p / "output"
                if inner.is_dir():
                    with contextlib.suppress(OSError):
                        os.replace(inner, dest)
                break
    for p in _stray(parent):
        if p.name.startswith(f".{dest.name}.moesim-"):
            _remove(p)
    if dest.is_dir():
        for p in _stray(dest):
            _remove(p)
        for sub in dest.iterdir():  # a file written atomically into a sub-folder
            if sub.is_dir() and not sub.is_symlink() and not is_temporary(sub.name):
                for p in _stray(sub):
                    _remove(p)


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
    if not os.access(probe, os.W_OK | os.X_OK) or _read_only(probe):
        raise InputError(
            "cannot write there (no permission or a read-only file system)",
            file=path,
            field=field,
            value=str(probe),
        )


def _read_only(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only (root may write anything
    else, so ``os.access`` alone does not tell)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def normal_permissions(path: Path) -> None:
    """Give a file (0666) or folder (0777) made by ``tempfile`` the permissions the umask
    would have given it (``mkstemp``/``mkdtemp`` create them private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _why(exc: OSError) -> str:
    return f"cannot write there ({exc.strerror or exc})"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; on error nothing changes.
    A ``path`` that is a folder, or under a file, is an :class:`InputError`; so is any
    failure to write (a full disk, no permission, a read-only file system)."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; expected a file name", file=path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise InputError("its folder is a file", file=path) from None
    except OSError as exc:
        raise InputError(_why(exc), file=path) from None
    os.close(fd)
    try:
        write(Path(tmp))
        normal_permissions(Path(tmp))  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a permission lost meanwhile: the old file stays
        Path(tmp).unlink(missing_ok=True)
        raise InputError(_why(exc), file=path) from None
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


# ----- output folders ------------------------------------------------------------------------


def _owns(kind: str, rel: PurePosixPath, is_dir: bool) -> bool:
    """Whether the entry ``rel`` (relative to the folder) is one a ``kind`` output writes."""
    parts = rel.parts
    if kind == "trace":
        if not parts[0].startswith("layer=") or not parts[0][6:].lstrip("-").isdigit():
            return False
        return (len(parts) == 1 and is_dir) or (
            len(parts) == 2 and not is_dir and rel.suffix == ".parquet"
        )
    names = {
        "run": RUN_FILES,
        "report": REPORT_FILES,
        "plan": PLAN_FILES,
        "sweep": SWEEP_FILES,
    }[kind]
    if kind == "run" and parts[0] == "contiguous":  # moesim demo's baseline run
        return (len(parts) == 1 and is_dir) or (len(parts) == 2 and parts[1] in names)
    return len(parts) == 1 and not is_dir and parts[0] in names


def _entries(folder: Path) -> Iterator[tuple[PurePosixPath, Path]]:
    """Every entry under ``folder`` but moesim's temporaries (links not followed)."""
    for root, dirs, files in os.walk(folder):
        base = PurePosixPath(Path(root).relative_to(folder).as_posix())
        dirs[:] = [d for d in dirs if not is_temporary(d)]
        for name in [*dirs, *files]:
            if not is_temporary(name):
                yield (base / name if base.parts else PurePosixPath(name)), Path(root) / name


def is_output_of(folder: Path, kind: str) -> bool:
    """Whether ``folder`` holds nothing but a ``kind`` output's files (an empty one does)."""
    return all(_owns(kind, rel, _is_dir(p)) for rel, p in _entries(folder))


def _is_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


Mode = Literal["new", "swap", "into"]


def check_output_folder(dest: str | Path, kind: str, *, force: bool = False) -> Mode:
    """Before any work: how a ``kind`` output will be written to ``dest``, or an
    :class:`InputError` (exit 2) when it cannot be.

    Returns ``"new"`` (nothing there), ``"swap"`` (a moesim output of that kind, or an empty
    folder, replaced whole) or ``"into"`` (only the kind's own files replaced, each
    atomically: ``force``, a link to a folder, or a report beside the output it reports on).
    Also removes temporaries that writers now gone left there.
    """
    dest = Path(dest)
    label = KINDS[kind]
    check_writable(dest)
    if dest.exists() and not dest.is_dir():
        raise InputError(
            f"exists and is not a moesim {label} folder (a file); choose another folder",
            file=dest,
            field="out",
            value=str(dest),
        )
    clean_stray_temporaries(dest)
    if not dest.exists():
        return "new"
    if is_output_of(dest, kind):
        return "into" if dest.is_symlink() else "swap"
    if force or any(is_output_of(dest, host) for host in _HOSTS.get(kind, ())):
        return "into"
    found = (str(rel) for rel, p in _entries(dest) if not _owns(kind, rel, _is_dir(p)))
    strangers = sorted(itertools.islice(found, 4))  # the first few: the folder may be large
    raise InputError(
        f"exists and is not a moesim {label} folder (it holds {', '.join(strangers[:3])}"
        f"{', ...' if len(strangers) > 3 else ''}); give --force to replace only moesim's "
        "own files there, or choose another folder",
        file=dest,
        field="out",
        value=str(dest),
    )


class OutputFolder:
    """Write one output folder whole: :meth:`begin` gives a temporary folder to render into,
    :meth:`commit` puts it in place (see the module's notes), :meth:`abort` drops it.

    Any ``OSError`` on the way (a full disk, no permission, a read-only file system) becomes
    a one-line :class:`InputError`, with the previous output intact and the temporary gone.
    """

    def __init__(self, dest: str | Path, kind: str, *, force: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        self.dest = Path(dest)
        self.kind = kind
        self.force = force
        self.tmp: Path | None = None
        self._mode: Mode | None = None

    def begin(self) -> Path:
        self._mode = check_output_folder(self.dest, self.kind, force=self.force)
        where = self.dest if self._mode == "into" else self.dest.parent
        try:
            where.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(self.dest.name), dir=where))
            tmp = tmp.rename(tmp.with_name(tmp.name + ".tmp"))
            normal_permissions(tmp)
        except (FileExistsError, NotADirectoryError):
            raise InputError("its folder is a file", file=self.dest, field="out") from None
        except OSError as exc:
            raise InputError(_why(exc), file=self.dest, field="out") from None
        self.tmp = tmp
        return tmp

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """``with out.writing() as tmp:`` render into ``tmp``; on leaving, the folder is
        committed, or on any error dropped (an ``OSError`` as a one-line :class:`InputError`)."""
        tmp = self.begin()
        try:
            yield tmp
        except OSError as exc:
            self.abort()
            raise InputError(_why(exc), file=self.dest, field="out") from None
        except BaseException:
            self.abort()
            raise
        self.commit()

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def commit(self) -> None:
        tmp = self.tmp
        if tmp is None:
            raise RuntimeError("OutputFolder.commit without begin")
        try:
            mode = check_output_folder(self.dest, self.kind, force=self.force)  # again: now
            if mode == "into" or self._mode == "into":
                self._write_into(tmp)
            else:
                self._swap(tmp)
        except OSError as exc:
            raise InputError(_why(exc), file=self.dest, field="out") from None
        finally:
            self.abort()

    def _swap(self, tmp: Path) -> None:
        dest = self.dest
        if not dest.exists():
            os.replace(tmp, dest)
            self.tmp = None
            return
        if _exchange(tmp, dest):  # one step: ``tmp`` now holds the old output
            shutil.rmtree(tmp, ignore_errors=True)
            self.tmp = None
            return
        # no atomic exchange here: set the previous output aside whole, rename the new one
        # in, then delete the old (a writer killed between the two leaves the old one aside,
        # and the next write puts it back: clean_stray_temporaries)
        aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest.name), dir=dest.parent))
        aside = aside.rename(aside.with_name(aside.name + ".old"))
        try:
            os.replace(dest, aside / "output")
        except BaseException:
            shutil.rmtree(aside, ignore_errors=True)
            raise
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(aside / "output", dest)  # put the old one back
            shutil.rmtree(aside, ignore_errors=True)
            raise
        self.tmp = None
        shutil.rmtree(aside, ignore_errors=True)

    def _write_into(self, tmp: Path) -> None:
        """Replace the kind's own files in ``dest`` by the new ones, each atomically; own
        files the new output does not have (an old trace's other layers) are removed after."""
        dest = self.dest
        dest.mkdir(parents=True, exist_ok=True)
        new = [rel for rel, p in _entries(tmp) if not p.is_dir()]
        for rel in new:
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() and not target.is_symlink():
                raise InputError(
                    "is a folder; moesim writes a file there", file=target, field="out"
                )
            part = target.parent / f"{_temp_prefix(target.name)}x.tmp"
            os.replace(tmp.joinpath(*rel.parts), part)  # same file system as the target
            try:
                os.replace(part, target)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        if self.kind != "trace":
            return
        keep = set(new)
        stale = [p for rel, p in _entries(dest) if rel not in keep and _owns("trace", rel, False)]
        for p in stale:
            p.unlink(missing_ok=True)
            if p.parent != dest and not any(p.parent.iterdir()):
                p.parent.rmdir()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = libc.renameat2
    except (OSError, AttributeError):
        return None
    return fn


_RENAMEAT2 = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where that is not available (other systems, file systems without it)."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_output_folder(
    dest: str | Path, kind: str, files: dict[str, bytes], *, force: bool = False
) -> dict[str, Path]:
    """Write ``files`` (relative name → content) as the ``kind`` output folder ``dest``:
    whole, or not at all (see :class:`OutputFolder`). Returns name → written path."""
    with OutputFolder(dest, kind, force=force).writing() as tmp:
        for name, data in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return {name: Path(dest) / name for name in files}
