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


def pytest_collection_modifyitems(items):
    """The README's newcomer run first: its commands run one after another for about two minutes, so
    started last (the file sorts late) it was the only thing left running at the end of `-n 2`."""
    items.sort(key=lambda item: item.get_closest_marker("newcomer") is None)


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

