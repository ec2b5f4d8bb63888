"""The mutation check (``launch/mutation_check.sh``, outside the suite: minutes) stays runnable:
each mutation's target text is still in the package exactly once, and each test it names exists.
When this fails, the code a mutation breaks has moved: update the mutation, then rerun the check."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from .helpers import PYTHON, ROOT, run_cmd

sys.path.insert(0, str(ROOT / "launch"))  # the script imports its table, launch/mutations.py, from beside it
spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "launch" / "mutation_check.py")
mutation_check = sys.modules["mutation_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_check)
MUTATIONS = mutation_check.MUTATIONS


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_still_applies(mutation):
    text = (ROOT / mutation.file).read_text()
    for old, new in mutation.edits:
        assert text.count(old) == 1, f"{mutation.file} no longer holds, once:\n{old}"
        assert old != new


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_names_tests_that_exist(mutation):
    assert mutation.tests
    for test in mutation.tests:
        path, name = re.fullmatch(r"(tests/\w+\.py)::(\w+)(\[[\w.:-]+\])?", test).group(1, 2)
        assert f"\ndef {name}(" in (ROOT / path).read_text(), test


def test_negative_control_a_target_that_moved_stops_the_check(tmp_path):
    (tmp_path / "f.py").write_text("x = 1\n")
    moved = mutation_check.Mutation("moved", "f.py", (("x = 2\n", "x = 3\n"),), ("tests/test_x.py::test_y",))
    with pytest.raises(SystemExit, match="occurs 0 times"):
        mutation_check.apply(moved, tmp_path)
    assert (tmp_path / "f.py").read_text() == "x = 1\n"


def test_every_named_test_id_is_collected(tmp_path):
    """Parametrized ids included (``[2-mlp-float64-sgd-trainer]``): a renamed case would leave the
    check's baseline with nothing to run."""
    ids = sorted({t for m in MUTATIONS for t in m.tests})
    proc = run_cmd([PYTHON, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids], ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
