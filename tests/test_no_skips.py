"""CI's guard against skips (tests/no_skips.py), with its control: the same skipping test passes
as a skip without ``DDP_DEMO_NO_SKIPS`` and fails with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .helpers import ROOT

SKIPPING = "import pytest\n\ndef test_needs_slurm():\n    pytest.skip('SLURM is not installed here')\n"


@pytest.mark.parametrize("no_skips, code, said", [("1", 1, "1 failed"), ("", 0, "1 skipped")])
def test_a_skip_fails_only_where_every_test_must_run(tmp_path, no_skips, code, said):
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDP_DEMO_NO_SKIPS": no_skips}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.no_skips", "-p", "no:cacheprovider",
                           "-q", "-rfs", "test_skipping.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code and said in proc.stdout, proc.stdout + proc.stderr
    if no_skips:
        assert "requires every test to run: Skipped: SLURM is not installed here" in proc.stdout, proc.stdout
