"""Break the package on purpose and check that the tests notice (issue 16).

    launch/mutation_check.sh                       # every mutation, a table at the end
    launch/mutation_check.sh --only checksum       # the mutations whose name contains a word
    launch/mutation_check.sh --list                # names, files and the tests each one runs

Each mutation is a few exact text replacements in one file of a fresh copy of the repository.
A replacement whose text is not found exactly once stops the script (the code moved: update the
mutation), so it can never test an unchanged package by accident. The tests named for the
mutation then run against the copy (``PYTHONPATH`` and the working directory point at it); every
test that fails or errors has caught it. The same tests first run on the unchanged copy and must
pass, or a failure would prove nothing. Exit 0 when every mutation is caught by at least one test.
The mutations are in launch/mutations.py; the table this prints is in docs/mutations.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from mutations import MUTATIONS, Mutation  # launch/mutations.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".*_cache")


def copy_repo(dest: Path) -> Path:
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    return repo


def apply(mutation: Mutation, repo: Path) -> None:
    """Make the edits; stop loudly if a target is not there exactly once."""
    path = repo / mutation.file
    text = path.read_text()
    for old, new in mutation.edits:
        if text.count(old) != 1:
            sys.exit(f"mutation_check: {mutation.name!r}: the text to replace occurs {text.count(old)} times in "
                     f"{mutation.file} (expected once); the code moved, so update the mutation:\n{old}")
        text = text.replace(old, new)
    path.write_text(text)


def failing_tests(repo: Path, tests: tuple[str, ...], log: Path) -> tuple[list[str], int]:
    """Run ``tests`` against ``repo``; the node ids that failed or errored, and how many ran."""
    report = log.with_suffix(".xml")
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    with open(log, "w") as out:  # its own session: if this script stops, torchrun's workers stop too
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=1800)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if not report.exists():
        return ["(pytest wrote no report: see " + str(log) + ")"], 0
    cases = ET.parse(report).getroot().iter("testcase")
    failed, ran = [], 0
    for case in cases:
        ran += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}")
    return failed, ran


def short(test_id: str) -> str:
    return test_id.removeprefix("tests/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/mutation_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run only the mutations whose name contains this text")
    p.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies and logs")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as each mutation finishes
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if args.list or not chosen:
        for m in chosen:
            print(f"{m.name} ({m.file}):\n  " + "\n  ".join(m.tests))
        return 0 if chosen else 2
    work = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    try:
        return run(chosen, work)
    finally:
        if args.keep:
            print(f"copies and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(chosen: list[Mutation], work: Path) -> int:
    every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    for m in chosen:  # every target exists before anything runs
        apply(m, copy_repo(work / "dry-run"))
        shutil.rmtree(work / "dry-run")
    start = time.monotonic()
    failed, ran = failing_tests(copy_repo(work / "baseline"), every_test, work / "baseline.log")
    print(f"baseline: {ran} tests on the unchanged package, {len(failed)} failed ({time.monotonic() - start:.0f} s)")
    if failed or ran < len(every_test):  # each node id runs at least one test; a wrong one runs none
        tail = "".join((work / "baseline.log").read_text().splitlines(keepends=True)[-15:])
        print("the tests must pass on the unchanged package first:\n  " + "\n  ".join(failed) + "\n" + tail)
        return 1
    rows = []
    for i, m in enumerate(chosen):
        start = time.monotonic()
        repo = copy_repo(work / f"m{i}")
        apply(m, repo)
        failed, ran = failing_tests(repo, m.tests, work / f"m{i}.log")
        rows.append((m, failed, ran))
        verdict = f"caught by {len(failed)} of {ran}" if failed else "NOT CAUGHT"
        print(f"{m.name}: {verdict} ({time.monotonic() - start:.0f} s)")
    print("\n| mutation | file | caught by (tests that failed / tests run) |\n| --- | --- | --- |")
    for m, failed, ran in rows:
        caught = ("<br>".join(f"`{short(t)}`" for t in failed) + f" ({len(failed)}/{ran})") if failed \
            else "**NOT CAUGHT**"
        print(f"| {m.name} | `{m.file}` | {caught} |")
    missed = [m.name for m, failed, _ in rows if not failed]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught" + (f"; NOT caught: {missed}" * bool(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
