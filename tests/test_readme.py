"""The README stays true: its commands run as written, its tour's outputs are what they
print, the demo prints its output block line for line, and every relative link in the
README and in docs/ leads to a file that exists.

The commands run in a temporary folder holding a copy of ``scenarios/`` (the only paths
they read), so what they write (``mine.yaml``, ``reports/...``) never lands in the
checkout; ``moesim`` is this checkout's package (``python -m moesim``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 250
# Commands the default run leaves to `-m slow`: the tour's sweep (8 cases, about 10 s on two
# cores), its report, which reads the sweep's results, and `a2a` at EP64 (about 6 s).
SLOW_COMMANDS = ("moesim sweep", "moesim report", "moesim a2a")
TIMING = re.compile(r"\bin \d+(\.\d+)? s\b")  # "... in 2.8 s": wall time, differs per run
COMMAND_TIMEOUT_S = 300

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def bash_blocks_with_output(text: str) -> list[tuple[str, str | None]]:
    """Each bash block's body and that of the text block right below it (only blank
    lines between), or None."""
    fences = list(_FENCE.finditer(text))
    out = []
    for i, m in enumerate(fences):
        if m.group(1) != "bash":
            continue
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        below = (
            nxt.group(2)
            if nxt and nxt.group(1) == "text" and not text[m.end() : nxt.start()].strip()
            else None
        )
        out.append((m.group(2), below))
    return out


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block as argument lists: backslash continuations
    joined, comments dropped, ``make`` lines skipped."""
    joined = re.sub(r"\\\n", " ", block)
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] != "make":
            out.append(argv)
    return out


def as_python(argv: list[str]) -> list[str]:
    """``moesim ...`` or ``.venv/bin/moesim ...`` as this interpreter's ``-m moesim``."""
    assert argv[0] in ("moesim", ".venv/bin/moesim"), (
        f"README.md: a bash block runs {argv[0]!r}; its blocks run moesim or make only"
    )
    return [sys.executable, "-m", "moesim", *argv[1:]]


def is_slow(argv: list[str]) -> bool:
    text = "moesim " + " ".join(argv[1:])
    return any(text.startswith(c) for c in SLOW_COMMANDS)


def expected_lines(text: str) -> list[str]:
    """The lines of an output block that a run must print: abridged lines (``...``) and
    lines with a wall time or the size of this machine's process pool left out."""
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if not s or "..." in s or TIMING.search(s) or "local processes" in s:
            continue
        keep.append(s)
    return keep


def run_readme(workdir: Path, *, slow: bool) -> list[str]:
    """Run the README's command lines in order in ``workdir`` (the slow ones only when
    ``slow``); check each exits 0 and prints its output block's lines. Returns the command
    lines run."""
    shutil.copytree(REPO / "scenarios", workdir / "scenarios")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ran = []
    for block, output in bash_blocks_with_output(README.read_text(encoding="utf-8")):
        argvs = commands(block)
        stdout = ""
        skipped = False
        for argv in argvs:
            if is_slow(argv) and not slow:
                skipped = True
                continue
            proc = subprocess.run(
                as_python(argv),
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
            line = shlex.join(argv)
            assert proc.returncode == 0, (
                f"README.md: `{line}` exits {proc.returncode}, {proc.stderr}"
            )
            stdout += proc.stdout + proc.stderr
            ran.append(line)
        if output is not None and stdout and not skipped:
            missing = [s for s in expected_lines(output) if s not in stdout]
            assert not missing, f"README.md: `{ran[-1]}` no longer prints {missing}"
    return ran


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_readme_command_parsing():
    block = (
        "make demo    # builds .venv\n"
        "moesim init a.yaml --nodes 2 \\\n"
        "    --trace scenarios/t   # a comment\n"
        ".venv/bin/moesim --help\n"
    )
    argvs = commands(block)
    assert argvs == [
        ["moesim", "init", "a.yaml", "--nodes", "2", "--trace", "scenarios/t"],
        [".venv/bin/moesim", "--help"],
    ]
    assert as_python(argvs[1]) == [sys.executable, "-m", "moesim", "--help"]
    assert is_slow(["moesim", "sweep", "x.yaml"]) and not is_slow(["moesim", "simulate"])
    assert expected_lines("a\n  ...\nwrote x in 2.8 s\n b \n") == ["a", "b"]


def test_readme_commands_run(tmp_path):
    ran = run_readme(tmp_path, slow=False)
    assert any(c.startswith("moesim init ") for c in ran)  # the tour was found and run


@pytest.mark.slow
def test_readme_commands_run_all(tmp_path):
    ran = run_readme(tmp_path, slow=True)
    assert any(c.startswith("moesim sweep") for c in ran)


@pytest.mark.slow
def test_demo_prints_the_readme_block(tmp_path):
    text = README.read_text(encoding="utf-8")
    block = next(body for lang, body in fenced_blocks(text) if body.startswith("$ make demo\n"))
    expected = block.splitlines()[1:]
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "demo"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    got = proc.stdout.splitlines()

    def untimed(lines: list[str]) -> list[str]:
        return [TIMING.sub("in S s", s) for s in lines]

    assert untimed(got) == untimed(expected)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    heads = re.findall(r"^#+\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _relative_links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize(
    "page",
    [README, *sorted((REPO / "docs").glob("*.md"))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_relative_links_exist(page):
    """Every relative link leads to a file that exists, and an anchor to a heading of it."""
    missing = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = page.parent / path if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)}: links to missing {missing}"


def test_anchor_slugs():
    assert _anchors(README) >= {"a-tour", "where-to-go-next"}


def test_docs_scenario_example_is_the_flame_scenario():
    """docs/scenarios-and-sweeps.md's example is scenarios/flame-moe-290m.yaml, with the
    optional fields it leaves out spelled at their defaults."""
    import yaml

    from moesim.scenario import Scenario

    page = (REPO / "docs" / "scenarios-and-sweeps.md").read_text(encoding="utf-8")
    example = next(body for lang, body in fenced_blocks(page) if lang == "yaml")
    shown = yaml.safe_load(example)
    bundled = yaml.safe_load((REPO / "scenarios" / "flame-moe-290m.yaml").read_text())
    assert set(shown) - set(bundled) == {"redundant_slots", "replica_choice"}
    assert Scenario.model_validate(shown) == Scenario.model_validate(bundled)
