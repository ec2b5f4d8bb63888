"""A command's ``main`` (the trainer's, explain's) on N processes forked from the warm server of
``core/spawn.py``.

A torchrun launch of N ranks starts N + 1 interpreters, and each spends about 3.5 s of CPU
importing torch and torch._dynamo before it trains (2 cores here: a 2-rank launch of 8 steps
costs 9 s of CPU). Where the launcher is not what a test is about (the strategies, ScratchFSDP,
accumulation), the ranks fork from ``core/spawn.py``'s server instead, which has imported all
that once. Each rank runs ``ddp_demo.train.main(argv)`` (or another module's ``main``) as
torchrun's worker would: from the
variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``),
so ``core/env.py`` reads it as a torchrun worker, joins the process group through the same
``setup``, prints and writes what it would. What is not here is torchrun's agent: restarts,
its failure report, killing the other ranks when one dies. tests/test_train.py, test_resilience.py,
test_elastic.py and the README's commands run the real one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddp_demo.core import spawn

from .helpers import LAUNCH_VARS, free_port


def _rank_main(rank: int, world_size: int, port: int, module: str, argv: list[str], logs: str, cwd: str,
               env: dict[str, str]) -> None:
    """One rank (``world_size`` 0: plain ``python``, no launcher): its stdout and stderr go to
    ``logs/rank{rank}.out`` and ``.err``; ``env`` is set last."""
    for var in [*LAUNCH_VARS, "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS"]:
        os.environ.pop(var, None)
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        os.environ.pop(var)
    if world_size:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS="1")  # torchrun's one thread per rank
        # ...which torch reads when the interpreter starts: this one started as the server, so set it
        # here (2 threads per rank on 2 cores spin: a 2-rank run of examples/ddp.py took 2.5x the CPU)
        torch.set_num_threads(1)
    os.environ.update(env)
    os.chdir(cwd)
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{logs}/rank{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 1
    try:
        code = _script(module, argv) if module.endswith(".py") else importlib.import_module(module).main(argv)
    finally:
        sys.stdout.flush()  # a forked worker leaves by os._exit: nothing flushes for it
        sys.stderr.flush()
        os._exit(code)


def _script(path: str, argv: list[str]) -> int:
    """A script run as ``python path argv...`` runs it (its ``__main__`` block); its exit code."""
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0


class _Job:
    def __init__(self, world_size: int, module: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                 logs: Path | None = None):
        self.logs = str(logs) if logs else tempfile.mkdtemp(prefix="ranks-")
        context = spawn.forkserver(__name__)
        port = free_port() if world_size else 0
        self.procs = [context.Process(target=_rank_main, args=(r, world_size, port, module, [str(a) for a in argv],
                                                                self.logs, str(cwd), env or {}), daemon=True)
                      for r in range(max(1, world_size))]
        for p in self.procs:
            p.start()

    def result(self, deadline: float) -> subprocess.CompletedProcess | None:
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        late = any(p.exitcode is None for p in self.procs)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        if late:
            return None
        read = lambda r, name: Path(f"{self.logs}/rank{r}.{name}").read_text()  # noqa: E731
        ranks = range(len(self.procs))
        code = next((p.exitcode for p in self.procs if p.exitcode), 0)
        return subprocess.CompletedProcess(["ranks"], code, "".join(read(r, "out") for r in ranks),
                                           "".join(read(r, "err") for r in ranks))


class ForkedRuns:
    """``{name: (N, argv)}``: ``module``'s ``main(argv)`` on N forked ranks (0: one plain process; a
    ``module`` ending in ``.py`` is a script, run as ``python module argv``),
    every job started at once, here; ``wait`` collects them, each result holding the ranks' stdout
    and stderr in rank order and the first non-zero exit code. Start them before a launch that
    should share the cores with them, and ``wait`` in a ``finally``: it kills what is left."""

    def __init__(self, jobs: dict[str, tuple[int, list[str]]], cwd: dict[str, Path], module: str = "ddp_demo.train"):
        self.started = {name: _Job(n, module, argv, cwd[name]) for name, (n, argv) in jobs.items()}

    def wait(self, timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
        """A job still running at ``timeout`` is killed and fails the test."""
        deadline = time.monotonic() + timeout
        done = {name: job.result(deadline) for name, job in self.started.items()}
        late = [name for name, result in done.items() if result is None]
        if late:
            pytest.fail(f"still running after {timeout:g} s: {', '.join(late)}")
        return done


def forked_runs(jobs: dict[str, tuple[int, list[str]]], cwd: dict[str, Path], module: str = "ddp_demo.train",
                timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """:class:`ForkedRuns` started and waited for."""
    return ForkedRuns(jobs, cwd, module).wait(timeout)


@contextlib.contextmanager
def ranks_by_hand(argv: list[str], cwd: Path, world_size: int = 2, module: str = "ddp_demo.train"):
    """``world_size`` ranks of ``module``'s ``main(argv)`` with no launcher at all (nothing restarts or
    stops them), joined through a store this test hosts on the port it bound (port 0: no race), as
    ``TORCHELASTIC_USE_AGENT_STORE`` workers: the ``multiprocessing.Process`` of each, to signal and
    join. Rank r writes ``cwd/rank{r}.out`` and ``.err``; whatever is left is killed at the end."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"MASTER_PORT": str(server.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    job = _Job(world_size, module, argv, cwd, env, logs=cwd)
    try:
        yield job.procs
    finally:
        for p in job.procs:
            if p.is_alive():
                p.kill()
            p.join()
