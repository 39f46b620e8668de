"""Mutation score of the formulas' folders (``moesim/sim``, ``moesim/costs``,
``moesim/placement``): mutmut changes one thing at a time (an operator, a constant, a
comparison) and runs the fast tests that cover the changed function; a mutant the tests
fail on is *killed*.

    python benchmarks/mutation.py                        # every mutant (hours on 2 cores)
    python benchmarks/mutation.py --modules moesim/sim/allreduce.py moesim/costs/roofline.py
    python benchmarks/mutation.py --sample 4             # a deterministic quarter
    python benchmarks/mutation.py --report               # print the last run's figures

The configuration (folders mutated, tests run, data copied) is ``[tool.mutmut]`` in
pyproject.toml; mutmut works on a copy of the project under ``mutants/``. Mutants are made
on the lines the selected tests execute only (``mutate_only_covered_lines``).

Printed per folder: killed, timeout (counted as killed: the change made a test hang),
survived, no tests (no selected test runs the function), not checked, and

    score = (killed + timeout) / (killed + timeout + survived + no tests)

over the mutants checked. ``--sample K`` keeps the mutants whose CRC-32 of the name is
0 modulo K (the same set on every machine and run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("moesim/sim", "moesim/costs", "moesim/placement")
#: mutmut's exit codes by verdict (mutmut.stats.status_by_exit_code)
KILLED = {1, 3}
TIMEOUT = {24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def _mutmut() -> str:
    return str(Path(sys.executable).with_name("mutmut"))


def _metas() -> dict[str, dict[str, int | None]]:
    """Exit code of each mutant, by source file (``moesim/sim/allreduce.py``)."""
    out = {}
    for meta in sorted((REPO / "mutants").glob("moesim/**/*.py.meta")):
        rel = str(meta.relative_to(REPO / "mutants"))[: -len(".meta")]
        out[rel] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def _in_sample(name: str, k: int) -> bool:
    return k <= 1 or zlib.crc32(name.encode()) % k == 0


def _verdict(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in KILLED:
        return "killed"
    if code in TIMEOUT:
        return "timeout"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "other"


def select(modules: list[str], k: int) -> list[str]:
    """Names of the mutants of ``modules`` (all three folders when empty) in the sample."""
    names = []
    for path, codes in _metas().items():
        if modules and path not in modules:
            continue
        if not any(path.startswith(f + "/") for f in FOLDERS):
            continue
        names += [n for n in codes if _in_sample(n, k)]
    return sorted(names)


def report(names: set[str] | None, *, list_survivors: bool = False) -> None:
    """Counts and score per folder over ``names`` (every mutant when None)."""
    rows: dict[str, Counter[str]] = {f: Counter() for f in FOLDERS}
    survivors = []
    for path, codes in _metas().items():
        folder = next((f for f in FOLDERS if path.startswith(f + "/")), None)
        if folder is None:
            continue
        for name, code in codes.items():
            if names is not None and name not in names:
                continue
            v = _verdict(code)
            rows[folder][v] += 1
            if v == "survived":
                survivors.append(name)
    cols = ["killed", "timeout", "survived", "no tests", "not checked", "other"]
    print(f"{'folder':<18}" + "".join(f"{c:>13}" for c in cols) + f"{'score':>9}")
    total: Counter[str] = Counter()
    for folder, c in [*rows.items(), ("all three", None)]:
        c = total if c is None else c
        if c is not total:
            total.update(c)
        caught = c["killed"] + c["timeout"]
        checked = caught + c["survived"] + c["no tests"]
        score = f"{100 * caught / checked:8.1f}%" if checked else "       -"
        print(f"{folder:<18}" + "".join(f"{c[k]:>13}" for k in cols) + score)
    if list_survivors:
        print("\nsurvived:")
        for n in sorted(survivors):
            print(" ", n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="*", default=[], help="source files (default: all)")
    ap.add_argument("--sample", type=int, default=1, help="keep 1 mutant in K (CRC-32)")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="print the last run's figures")
    ap.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    args = ap.parse_args()
    if not args.report:
        if not (REPO / "mutants").is_dir():
            # generate the mutants and collect which tests cover which function; a pattern
            # that matches no mutant stops mutmut right after (it exits with an error)
            subprocess.run([_mutmut(), "run", "no-such-mutant"], cwd=REPO, check=False)
        names = select(args.modules, args.sample)
        if not names:
            sys.exit("no mutant selected")
        print(f"running {len(names)} mutants", flush=True)
        subprocess.run(
            [_mutmut(), "run", "--max-children", str(args.max_children), *names],
            cwd=REPO,
            check=False,
        )
    chosen = set(select(args.modules, args.sample)) if (args.modules or args.sample > 1) else None
    report(chosen, list_survivors=args.survivors)


if __name__ == "__main__":
    main()
