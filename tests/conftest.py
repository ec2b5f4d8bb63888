"""Shared helpers: run the package's commands as a user would, with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]


def run_cmd(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion (or fail the test at ``timeout``), capturing its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)  # a test must not inherit a launcher's identity
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, module: str, *flags: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` picks a free port for its rendezvous: no fixed ports."""
    return run_cmd([*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *flags], cwd, timeout)


def train(*flags: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """A plain single-process run (no launcher)."""
    return run_cmd([PYTHON, "-m", "ddp_demo.train", *flags], cwd, timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
