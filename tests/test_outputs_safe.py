"""Outputs are never lost: failed writes leave the previous file whole, and an output that
cannot be written is refused before any work."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moesim import fileio
from moesim.errors import InputError
from moesim.fileio import (
    RUN_FILES,
    atomic_write,
    atomic_write_text,
    check_output_folder,
    check_writable,
    write_output_folder,
)
from moesim.traces.store import read_trace
from tests.conftest import REPO, run_moesim


def test_a_full_disk_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def write(p):
        p.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InputError, match=r"cannot write there \(No space left on device\)"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="its folder is a file") as err:
        check_writable(tmp_path / "afile" / "out")
    assert err.value.field == "out"
    check_writable(tmp_path / "new" / "deeper")  # a folder to be made: fine
    for cmd in (
        ["simulate", "scenarios/demo.yaml", "--out", str(tmp_path / "afile" / "o")],
        ["trace", "synth", "--experts", "8", "--top-k", "2", "--layers", "1", "--tokens",
         "10", "--out", str(tmp_path / "afile" / "t")],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "moesim", *cmd], cwd=REPO, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "its folder is a file" in proc.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_a_typo_is_named_not_the_field_it_left_missing(tmp_path):
    import yaml

    from moesim.scenario import load_scenario

    data = yaml.safe_load((REPO / "scenarios" / "demo.yaml").read_text())
    data["hardwre"] = data.pop("hardware")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as err:
        load_scenario(path)
    assert (err.value.field, err.value.message) == ("hardwre", "unknown field")
    data["hardware"] = data.pop("hardwre")
    data["dispatcher"] = "gloo"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="unknown preset; valid") as err:
        load_scenario(path)
    assert "Value error" not in str(err.value)


# ----- output folders: refused, forced, swapped whole, cleaned ----------------------------

RUN = {name: f"old {name}".encode() for name in RUN_FILES}


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run the command line in this process: (exit status, stderr)."""
    from moesim.cli import main

    argv = sys.argv
    sys.argv = ["moesim", *args]
    try:
        main()
        rc = 0
    except SystemExit as stop:
        rc = int(stop.code or 0)
    finally:
        sys.argv = argv
    return rc, capsys.readouterr().err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _foreign(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    (folder / "summary.md").write_text("my own summary")
    return folder


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "scenarios/demo.yaml"],
        ["demo"],
        ["report", "tests"],
        ["plan-capacity", "--model", "Mixtral-8x7B", "--hardware", "H100-SXM", "--nodes", "1"],
        ["trace", "synth", "--experts", "8", "--top-k", "2", "--layers", "1", "--tokens", "10"],
        ["trace", "import", "x.jsonl", "--format", "flame-jsonl"],
        ["capture", "hf-config:mixtral"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_folder_that_is_not_that_output_is_refused_before_any_work(tmp_path, capsys, args):
    folder = _foreign(tmp_path)
    before = _snapshot(folder)
    if args[0] == "report":  # a simulate output folder to report on
        write_output_folder(tmp_path / "run", "run", RUN)
        args = ["report", str(tmp_path / "run")]
    rc, err = _cli(capsys, *args, "--out", str(folder))
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{folder}: field 'out'" in err and "give --force" in err and "notes.txt" in err
    assert _snapshot(folder) == before


def test_force_replaces_only_moesims_own_files(tmp_path, capsys):
    folder = _foreign(tmp_path)
    synth = ["trace", "synth", "--experts", "8", "--top-k", "2", "--tokens", "50"]
    assert _cli(capsys, *synth, "--layers", "3", "--out", str(folder), "--force")[0] == 0
    assert _cli(capsys, *synth, "--layers", "2", "--out", str(folder), "--force")[0] == 0
    assert read_trace(folder).layers == (0, 1)  # the old trace's third layer went with it
    assert sorted(p.name for p in folder.iterdir()) == [
        "layer=0", "layer=1", "notes.txt", "summary.md",
    ]  # fmt: skip
    assert (folder / "notes.txt").read_text() == "precious"
    # a run output: its summary.md is moesim's, replaced; the notes stay
    write_output_folder(folder, "run", RUN, force=True)
    got = _snapshot(folder)
    assert got["notes.txt"] == b"precious" and got["summary.md"] == b"old summary.md"
    assert all(got[name] == data for name, data in RUN.items())
    # a sweep: refused among other files, unless --force
    from moesim.sweep.results import ResultsFolder
    from moesim.sweep.spec import load_sweep
    from tests.test_sweep import SMALL, write_sweep

    sweep = load_sweep(write_sweep(tmp_path, axes=SMALL))
    with pytest.raises(InputError, match="--force to write the sweep's files beside them"):
        ResultsFolder(folder, sweep)
    ResultsFolder(folder, sweep, force=True).create()
    assert (folder / "sweep.json").is_file() and (folder / "notes.txt").read_text() == "precious"


def test_an_old_output_is_recognised_by_its_files_and_replaced_whole(tmp_path):
    out = tmp_path / "out"
    write_output_folder(out, "run", RUN | {f"contiguous/{n}": b"c" for n in RUN})  # the demo's
    new = {name: f"new {name}".encode() for name in RUN_FILES[:3]}
    write_output_folder(out, "run", new)  # no --force needed: nothing but a run's files
    assert _snapshot(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a report beside the output it reports on replaces only report.html and summary.md
    write_output_folder(out, "report", {"report.html": b"r", "summary.md": b"m"})
    assert _snapshot(out) == new | {"report.html": b"r", "summary.md": b"m"}


def _fail_at(monkeypatch, point: str, code: int) -> None:
    """Make the ``point`` step of an output folder's write fail with OSError(``code``)."""
    real_write, real_replace = Path.write_bytes, os.replace
    calls = {"n": 0}

    def boom(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if point == "start":
        monkeypatch.setattr(tempfile, "mkdtemp", boom)
    elif point == "render":  # the third file of the new output

        def write_bytes(self, data):
            calls["n"] += 1
            if calls["n"] == 3:
                real_write(self, data[:5])
                boom()
            return real_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    elif point == "swap":
        monkeypatch.setattr(fileio, "_RENAMEAT2", None)

        def replace(src, dst):
            if Path(src).name.endswith(".tmp") and Path(dst).name == "out":
                boom()  # the old output is aside: the new one cannot go in
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    else:  # exchange
        monkeypatch.setattr(fileio, "_exchange", boom)


@pytest.mark.parametrize("point", ["start", "render", "swap", "exchange"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_failed_write_leaves_the_old_folder_whole_and_no_temporary(
    tmp_path, monkeypatch, point, code
):
    out = tmp_path / "out"
    write_output_folder(out, "run", RUN)
    _fail_at(monkeypatch, point, code)
    with pytest.raises(InputError, match=rf"field 'out': cannot write there \({os.strerror(code)}"):
        write_output_folder(out, "run", {name: b"new" for name in RUN_FILES})
    monkeypatch.undo()
    assert _snapshot(out) == RUN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_trace_write_that_fails_midway_is_one_line_and_keeps_the_old_trace(
    tmp_path, capsys, monkeypatch, code
):
    out = tmp_path / "out"
    synth = ["trace", "synth", "--experts", "8", "--top-k", "2", "--layers", "2", "--out", str(out)]
    assert _cli(capsys, *synth, "--tokens", "40")[0] == 0
    before = _snapshot(out)
    import pyarrow.parquet as pq

    real = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def write_table(self, table, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(code, os.strerror(code))
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    rc, err = _cli(capsys, *synth, "--tokens", "60")
    assert rc == 2 and err.count("\n") == 1 and os.strerror(code) in err, err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_reader_sees_the_old_folder_or_the_new_one_never_a_mixture(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = {name: b"old" for name in RUN_FILES}
    new = {name: b"new" for name in RUN_FILES}
    write_output_folder(out, "run", old)
    seen = []
    real_exchange = fileio._exchange

    def exchange(a, b):
        seen.append(_snapshot(out))
        done = real_exchange(a, b)
        seen.append(_snapshot(out))
        return done

    monkeypatch.setattr(fileio, "_exchange", exchange)
    monkeypatch.setattr(Path, "write_bytes", _spying(Path.write_bytes, out, seen))
    write_output_folder(out, "run", new)
    assert seen[-1] == new and all(s in (old, new) for s in seen), seen
    assert seen.count(old) == len(seen) - 1  # the new folder appeared in one step


def _spying(real, out, seen):
    def write_bytes(self, data):
        seen.append(_snapshot(out))
        return real(self, data)

    return write_bytes


def test_a_dead_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    out = tmp_path / "out"
    write_output_folder(out, "run", RUN)
    beside = tmp_path / f".out.moesim-{pid}-abc12345.tmp"
    beside.mkdir()
    (beside / "metrics.parquet").write_bytes(b"half")
    inside = out / f".summary.md.moesim-{pid}-x.tmp"
    inside.write_bytes(b"half")
    live = tmp_path / f".out.moesim-{os.getppid()}-live.tmp"  # another writer, still running
    live.mkdir()
    write_output_folder(out, "run", RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])
    assert _snapshot(out) == RUN
    # a writer killed between setting the old output aside and renaming the new one in
    aside = tmp_path / f".out.moesim-{pid}-abc.old"
    aside.mkdir()
    os.replace(out, aside / "output")
    check_output_folder(out, "run")
    assert _snapshot(out) == RUN and not aside.exists()


def _marked(marker: str) -> list[str]:
    """Live (not zombie) processes whose environment carries ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() not in (proc / "environ").read_bytes():
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        if state != "Z":
            found.append(f"{proc.name} {cmd}")
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_sweep_leaves_no_process_and_resumes_to_the_same_table(tmp_path):
    """SIGKILL to the sweep's own process only (not its group): its forkserver, workers and
    resource tracker go with it; a re-run does the missing cases and the table is
    byte-identical to a sweep never killed."""
    from moesim.sweep.spec import load_sweep
    from tests.test_sweep import CountingExecutor, _rows, _run, write_sweep

    path = write_sweep(
        tmp_path,
        axes={"mode": ["training"], "capacity.factor": [1.0, 1.25, 1.5, 2.0], "seed": [0, 1]},
    )
    out = tmp_path / "out"
    marker = f"MOESIM_SWEEP_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moesim", "sweep", str(path), "--out", str(out), "--workers", "2"],
        cwd=REPO,
        env=os.environ | {key: value},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while _rows(out / "results.parquet") < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.02)
        assert len(_marked(marker)) >= 4  # sweep, forkserver, tracker, workers
        proc.kill()
    finally:
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == []
    done = _rows(out / "results.parquet")
    assert 2 <= done < 8, done  # killed midway, the table readable
    proc2 = run_moesim("sweep", str(path), "--out", str(out), "--workers", "1")
    assert proc2.returncode == 0, proc2.stderr
    assert f"{8 - done} run now" in proc2.stdout
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["case_index"] for r in rows] == list(range(8))
    assert {c.case_id for c in load_sweep(path).cases} == {r["case_id"] for r in rows}
    assert not list(out.glob(".*.tmp"))  # a killed write's temporary is cleared
    clean = tmp_path / "clean"
    _run(path, clean, CountingExecutor())
    assert (clean / "results.parquet").read_bytes() == (out / "results.parquet").read_bytes()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where this machine lets the tests mount one (else skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                               capture_output=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot mount a tmpfs here")
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=20)


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(small_disk, capsys):
    out = small_disk / "trace"
    synth = ["trace", "synth", "--experts", "64", "--top-k", "8", "--layers", "2",
             "--out", str(out)]  # fmt: skip
    assert _cli(capsys, *synth, "--tokens", "1000")[0] == 0
    before = _snapshot(out)
    filler = small_disk / "filler"
    with filler.open("wb") as f:  # leave about 64 KiB free
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        f.write(b"\0" * max(0, free - (64 << 10)))
    rc, err = _cli(capsys, *synth, "--tokens", "200000", "--seed", "1")
    assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert _snapshot(out) == before
    run = small_disk / "run"
    write_output_folder(run, "run", {"summary.md": b"old"})
    with pytest.raises(InputError, match="No space left on device"):
        write_output_folder(run, "run", {"phases.parquet": b"\1" * (1 << 20)})
    assert _snapshot(run) == {"summary.md": b"old"}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "run", "trace"]
