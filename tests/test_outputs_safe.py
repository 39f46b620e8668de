"""Outputs are never lost: failed writes leave the previous file whole, and an output that
cannot be written is refused before any work."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from moesim.errors import InputError
from moesim.fileio import atomic_write, atomic_write_text, check_writable
from tests.conftest import REPO


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
