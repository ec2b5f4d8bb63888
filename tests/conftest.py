"""pytest configuration and shared fixtures. Shared helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import subprocess

import pytest

from .helpers import main_in_process


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

