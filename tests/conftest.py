"""pytest configuration and shared fixtures. Shared helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import subprocess

import pytest
import torch

from .helpers import main_in_process
from .no_skips import pytest_runtest_makereport  # noqa: F401  (a hook: CI fails a skipped test)

# One intra-op thread per test process, as torchrun gives each worker: `-n 2` runs two test processes
# on the 2 cores, and torch's default (a thread per core) spends the time handing the suite's tiny ops
# between threads (core/env.py's PLAIN_PYTHON_THREADS says the same of the trainer).
torch.set_num_threads(1)


@pytest.fixture
def in_process(monkeypatch, capsys):
    """``run(*argv)``: ``ddp_demo.train.main(argv)`` in this process (see ``main_in_process``);
    returns its exit code and output as a CompletedProcess."""
    capsys.readouterr()

    def run(*argv) -> subprocess.CompletedProcess:
        code = main_in_process(argv, monkeypatch)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, captured.out, captured.err)

    return run

