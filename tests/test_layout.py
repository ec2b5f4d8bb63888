"""One-way imports (issue 20): each command loads what it needs and nothing above it.

``python -m ddp_demo.check`` once loaded 39 ddp_demo modules, the trainer, the doctor and
resilience among them, because it took a learning rate from proof/equivalence.py, which imports
the trainer. A fresh interpreter now lists what the check's entry loads (its ``--help``, then a
whole check at N = 1); the control, importing ``ddp_demo.train`` in the same interpreter, shows
that the list does catch those modules. ``core/`` is the ground floor: it imports nothing above it.
"""

from __future__ import annotations

import ast
import json

from .helpers import PYTHON, ROOT, run_cmd

# What the check must never load: the trainer and the folders only the trainer needs.
ABOVE_THE_CHECK = ("ddp_demo.train", "ddp_demo.doctor", "ddp_demo.resilience", "ddp_demo.proof")

LOADED = """
import contextlib, io, json, sys
from ddp_demo.check.__main__ import main

def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] == "ddp_demo")

with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
after_help = loaded()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(["examples/check/batchnorm_cnn.py:build_synced", "--world-sizes", "1", "--steps", "1"])
after_run = loaded()
import ddp_demo.train  # the control
print(json.dumps({"help": after_help, "run": after_run, "code": code, "control": loaded()}))
"""


def above(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(ABOVE_THE_CHECK)]


def test_the_check_loads_no_trainer_doctor_resilience_or_proof():
    proc = run_cmd([PYTHON, "-c", LOADED], ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["code"] == 0, "the check run did not pass: the list after it would prove little"
    assert above(got["help"]) == [] and above(got["run"]) == [], got
    assert len(got["run"]) < 30, f"{len(got['run'])} modules: {got['run']}"  # 39 before issue 20
    # the control: the same listing sees the trainer and what it pulls in
    control = above(got["control"])
    assert "ddp_demo.train" in control, control
    assert any(m.startswith("ddp_demo.doctor.") for m in control) and any(m.startswith("ddp_demo.resilience.")
                                                                          for m in control), control


def imports_of(path) -> set[str]:
    """The ddp_demo modules a file imports (at any depth of its body)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.split(".")[0] == "ddp_demo"}


def test_core_imports_nothing_above_it():
    core = ROOT / "ddp_demo" / "core"
    upward = {f"core/{p.name} -> {m}" for p in core.glob("*.py") for m in imports_of(p)
              if not m.startswith("ddp_demo.core")}
    assert upward == set()


def test_negative_control_the_import_reader_sees_an_arrow_up(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from ddp_demo.plots import figures\n")
    assert imports_of(mod) == {"ddp_demo.plots"}
