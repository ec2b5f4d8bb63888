"""What the tests share: running the package's commands as a user would, and comparing results."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from ddp_demo import train as trainer
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.proof.agreement import agreement_on_rank
from ddp_demo.proof.autocast import autocast_cases_on_rank
from ddp_demo.proof.cases import accum_cases, by_case, cases, check_accumulation, run_cases
from ddp_demo.proof.equivalence import AccumCase, Case
from ddp_demo.resilience import checkpoint

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]
# Launch settings a CI machine (or an outer torchrun) might have set: a test must not
# inherit a launcher's identity, so every command starts without them and states its own.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE",
               "NODE_RANK", "RDZV_HOST", "RDZV_PORT", "RDZV_ID", "RDZV_EXTERNAL", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME",
               "DOCTOR")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment less any launcher's: run inside a SLURM job, the suite's own processes
    would otherwise read its ``SLURM_*`` variables as their rank and world size (core/dist.py)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def main_in_process(argv, monkeypatch: pytest.MonkeyPatch) -> int:
    """``ddp_demo.train.main(argv)`` in this process, as plain ``python`` runs it (no launcher, one
    process). For work that needs no process group it costs milliseconds where a subprocess costs seconds."""
    # OMP_NUM_THREADS too: plain python exports it (core/env.py), and monkeypatch takes it back afterwards
    for var in (*LAUNCH_VARS, "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    return trainer.main([str(a) for a in argv])


def run_cmd(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion (or fail the test at ``timeout``), capturing its output.

    It runs in a session of its own, and whatever is left of that session afterwards is
    killed: on a timeout or an interrupted test, torchrun's workers go with torchrun."""
    proc = subprocess.Popen(args, cwd=cwd, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in ``proc``'s session (``start_new_session=True``), then reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left
    proc.wait()


class Command(NamedTuple):
    """One command for ``run_at_once``: its arguments, where it runs, extra environment."""

    args: list[str]
    cwd: Path
    env: dict[str, str] | None = None


def run_at_once(commands: dict[str, Command], timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once and wait for all: each launch spends seconds importing torch on
    one core and waiting at exit, so launches that do not depend on each other (or on timing) share
    the two cores instead of taking turns. Output goes to files, so no command blocks on a full pipe
    while another is read. At ``timeout`` all are killed and the test fails naming those left;
    whatever is left of each command's session is killed at the end (as ``run_cmd`` does)."""
    started: dict[str, tuple[subprocess.Popen, object, object]] = {}
    try:
        for name, (args, cwd, env) in commands.items():
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            started[name] = (subprocess.Popen(args, cwd=cwd, env=clean_env(env), stdout=out, stderr=err, text=True,
                                              start_new_session=True), out, err)
        deadline = time.monotonic() + timeout
        left = [name for name, (proc, _, _) in started.items() if _wait(proc, deadline) is None]
        if left:
            pytest.fail(f"still running after {timeout:g} s: {', '.join(left)}")
        return {name: subprocess.CompletedProcess(proc.args, proc.returncode, _read(out), _read(err))
                for name, (proc, out, err) in started.items()}
    finally:
        for proc, out, err in started.values():
            kill_session(proc)
            out.close()
            err.close()


def _wait(proc: subprocess.Popen, deadline: float) -> int | None:
    try:
        return proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def _read(file) -> str:
    file.seek(0)
    return file.read()


def torchrun_args(nproc: int, module: str, *flags: str) -> list[str]:
    """``torchrun --standalone`` picks a free port for its rendezvous: no fixed ports."""
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *flags]


def torchrun(nproc: int, module: str, *flags: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun_args`` run to completion."""
    return run_cmd(torchrun_args(nproc, module, *flags), cwd, timeout)


def train(*flags: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """A plain single-process run (no launcher)."""
    return run_cmd([PYTHON, "-m", "ddp_demo.train", *flags], cwd, timeout)


def free_port() -> int:
    """A port nothing listens on right now, for servers that cannot be handed port 0 and report
    the port they got (torchrun's rendezvous, the doctor's checks). Another process may take
    it before the server binds it: where the code allows, bind port 0 instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_clear_line(proc: subprocess.CompletedProcess, flag: str, out_dir: Path, *words: str) -> None:
    """Bad input: exit 2, one line on stderr naming ``flag`` (and ``words``), nothing else, nothing written."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ddp_demo: error: ") and all(w in lines[0] for w in (flag, *words)), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out_dir.exists()


def metrics(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def global_batches(out: Path, world_size: int, global_batch: int) -> list[list[int]]:
    """Each step's global batch from a ``--record-samples`` run, after checking how it was
    split: one share per rank, ``B / N`` samples each, no sample on two ranks."""
    batches = []
    for row in metrics(out):
        shares = row["sample_ids"]
        assert [len(s) for s in shares] == [global_batch // world_size] * world_size, (row["step"], shares)
        union = sorted(i for share in shares for i in share)
        assert len(set(union)) == global_batch, f"step {row['step']}: a sample on two ranks: {shares}"
        batches.append(union)
    return batches


def continued_from(out: Path, logged: list[dict]) -> bool:
    """The run in ``out`` took its first steps from a checkpoint whose ``logs`` were ``logged``
    (read before the resume: a run that redid the work would rewrite that checkpoint), wall-clock
    rates included. A redone step logs another rate, so this tells a resume from a rerun."""
    return len(logged) > 0 and metrics(out)[: len(logged)] == logged


def small_data(path: Path) -> Path:
    """The resume tests' data file: 64 samples of 10 features (seed 5), labelled by the first one's sign."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=g)
    torch.save((x, (x[:, 0] > 0).long()), path)
    return path


def rewrite_checkpoint(path: Path, change, checksum: bool = True) -> None:
    """Load a checkpoint, ``change(state)``, save it back: with a matching ``.sha256`` (a checkpoint
    that verifies but holds other values), or keeping the old one (a damaged checkpoint)."""
    state = checkpoint.load(path)
    change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getvalue())
    if checksum:
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(buf.getvalue()).hexdigest() + "\n")


def nudge_weights(state: dict) -> None:
    """Move the checkpoint's first weight tensor by 0.5: a run resumed from it must end elsewhere."""
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] + 0.5


def tensors(tree) -> list[torch.Tensor]:
    """Every tensor in a nested state (an optimizer's state_dict), in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in tensors(item)]


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


@functools.cache
def equivalence_rows(world_size: int) -> dict[Case, list[dict]]:
    """Start ``world_size`` processes once and run every equivalence case in them (proof/cases.py)."""
    return by_case(run_cases(world_size, cases(), timeout=240))


@functools.cache
def accumulation_rows(world_size: int) -> dict[AccumCase, list[dict]]:
    """Start ``world_size`` processes once and run every accumulation case in them."""
    return by_case(check_accumulation(world_size, accum_cases(world_size), timeout=240))


def describe_ranks(rows: list[dict], key: str = "max_abs_diff") -> str:
    """``rank 0: 1.2e-16, rank 1: ...``: a row's ``key`` per rank, for a failure message."""
    return ", ".join(f"rank {r['rank']}: {key} {r[key]:.3g}" for r in rows)
