"""moesim.model.capture_cmd.capture_source: what ``moesim capture`` does, called from Python;
the command writes the same trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.model.capture_cmd import capture_source
from moesim.traces.store import read_trace
from tests.conftest import run_moesim as moesim

pytest.importorskip("transformers")
pytest.importorskip("torch")


def test_capture_source_writes_what_the_command_writes(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh" * 12)  # 96 bytes: token ids are the bytes (vocabulary 256)
    trace = capture_source(
        "hf-config:olmoe", tmp_path / "py", text_file=text, tokens=96, seq_len=48, seed=1
    )
    # 96 tokens in sequences of 48: a batch of 2; tiny OLMoE: 4 MoE layers of 8, top-2
    assert (trace.num_tokens, trace.layers, trace.num_experts, trace.top_k) == (
        96,
        (0, 1, 2, 3),
        8,
        2,
    )
    assert (trace.meta["capture"]["batch"], trace.meta["capture"]["seq_len"]) == (2, 48)
    assert trace.meta["capture"]["corpus"] == str(text)
    back = read_trace(tmp_path / "py")
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    args = ("--text-file", str(text), "--tokens", "96", "--seq-len", "48", "--seed", "1")
    proc = moesim("capture", "hf-config:olmoe", "--out", str(tmp_path / "cli"), *args)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(read_trace(tmp_path / "cli").expert_ids, trace.expert_ids)


def test_capture_source_bad_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="source must be"):
        capture_source("mixtral", tmp_path / "t")
