"""What the tests share: running the package's commands as a user would, and comparing results."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.proof.agreement import agreement_on_rank
from ddp_demo.proof.autocast import autocast_cases_on_rank
from ddp_demo.proof.spawn import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]
# Launch settings a CI machine (or an outer torchrun) might have set: a test must not
# inherit a launcher's identity, so every command starts without them and states its own.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE",
               "NODE_RANK", "RDZV_HOST", "RDZV_PORT", "RDZV_ID", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME", "DOCTOR")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment less any launcher's: run inside a SLURM job, the suite's own processes
    would otherwise read its ``SLURM_*`` variables as their rank and world size (core/dist.py)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_cmd(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion (or fail the test at ``timeout``), capturing its output."""
    return subprocess.run(args, cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, module: str, *flags: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` picks a free port for its rendezvous: no fixed ports."""
    return run_cmd([*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *flags], cwd, timeout)


def train(*flags: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """A plain single-process run (no launcher)."""
    return run_cmd([PYTHON, "-m", "ddp_demo.train", *flags], cwd, timeout)


def free_port() -> int:
    """A port nothing listens on right now (for servers that cannot be handed port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: Path | str) -> dict:
    """A ``final.pt`` or other plain state dict (tensors only: weights_only)."""
    return torch.load(path, weights_only=True)


def max_diff(a: dict | Path | str, b: dict | Path | str) -> float:
    """The largest absolute difference between two state dicts (or the files holding them)."""
    a, b = (load(x) if isinstance(x, (str, Path)) else x for x in (a, b))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


COMPARE_LINE = re.compile(r"^(.+): largest \|loss - reference\| (\S+) at step (\d+); (\d+) of \d+ steps exactly equal$",
                          re.M)


def compare_report(stdout: str) -> dict[str, dict]:
    """What ``python -m ddp_demo.compare`` printed: per run label, its largest difference from the
    reference, the step of it, and how many steps were exactly equal."""
    return {label: {"largest": float(value), "step": int(step), "exact": int(exact)}
            for label, value, step, exact in COMPARE_LINE.findall(stdout)}


def agreement_and_autocast_on_rank(ctx: DistContext) -> dict:
    """The bodies of test_agree.py and test_precision.py, in one process group: starting one
    costs seconds, a case milliseconds."""
    return {"agreement": agreement_on_rank(ctx), "autocast": autocast_cases_on_rank(ctx, MODEL_NAMES)}


@functools.cache
def agreement_and_autocast_ranks() -> list[dict]:
    return run_on_ranks(agreement_and_autocast_on_rank, 2, timeout=180)
