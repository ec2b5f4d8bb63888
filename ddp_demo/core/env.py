"""The one place that reads the launcher's environment; it imports no torch.

``launch_env()`` turns torchrun's ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (or, for tasks
started by SLURM's ``srun``, ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NTASKS``) into a
:class:`LaunchEnv`, a value that core/dist.py's ``setup()`` turns into a process group.
``launch_variables()`` hands the launch doctor (``python -m ddp_demo.doctor`` and the trainer's
``--preflight``) the launch scripts' variables. No other module reads ``os.environ``
(tests/test_launch_env.py greps the package). Torch-free, so that the doctor, which must answer
on a node before anything is installed right, can use it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ddp_demo.core.slurm import expand_counts, expand_hostlist


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process. Without a launcher: one process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by a launcher: join a process group even when N = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: which attempt this is
    agent_store: bool = False  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)
    attempt_prefix: bool = True  # DDP_DEMO_SHARED_STORE=1 turns the restart fix off (to show the bug)
    threads: int | None = None  # intra-op threads to set, where torchrun would have set OMP_NUM_THREADS
    launcher: str = "python"  # who started it: python (nobody), torchrun, ray or srun; summary.json records it
    error_file: str | None = None  # torchrun's TORCHELASTIC_ERROR_FILE: where its report finds our error


# Plain `python -m ddp_demo.train` with OMP_NUM_THREADS unset gets one intra-op thread, as each
# of torchrun's workers does. The built-in jobs' tensors are small: on the 2-core machine torch's
# default (a thread per core) made the default job train 3x slower (3.1 s against 1.1 s, issue
# 26; docs/trainer.md#threads), the time going to handing tiny ops between threads. A user's
# OMP_NUM_THREADS stands.
PLAIN_PYTHON_THREADS = 1


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Who started this process: torchrun (its variables win), else ``srun``, else nobody.

    A pure function of ``environ`` (``os.environ`` when None), read once at start-up.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and RAY_RESTARTS in env:
        return ray_env(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return torchrun_env(env)
    # Only srun's tasks carry SLURM_STEP_ID: the batch script itself (and python started in
    # it without srun) sees SLURM_PROCID=0 and the job's SLURM_NTASKS too, and would wait for
    # ranks nobody starts; Lightning guesses this from the job's name ("bash", "interactive").
    # One task needs no process group.
    if "SLURM_STEP_ID" in env and slurm_world_size(env) > 1:
        return srun_env(env)
    return LaunchEnv(threads=None if "OMP_NUM_THREADS" in env else PLAIN_PYTHON_THREADS)


# Set by ddp_demo.train_ray's worker function: how many times Ray has started this rank before
# (Ray tells a worker nothing of earlier attempts; its StartCounter counts them).
RAY_RESTARTS = "DDP_DEMO_RAY_RESTARTS"


def ray_env(env: dict[str, str]) -> LaunchEnv:
    """A Ray Train worker: Ray's TorchTrainer sets torchrun's variables (and has joined the
    process group already, see ddp_demo/train_ray.py); the restart count is ddp_demo's."""
    return dataclasses.replace(torchrun_env(env), restart_count=int(env[RAY_RESTARTS]), launcher="ray")


def launch_variables(environ: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment as the launch doctor's ``plan_from_env`` takes it (it picks
    launch/multinode.sh's variables: ``NNODES``, ``RDZV_HOST``, ``MASTER_ADDR``, ...): read
    here, like the rest of the launcher's environment, and passed down as a value."""
    return dict(os.environ if environ is None else environ)


def torchrun_env(env: dict[str, str]) -> LaunchEnv:
    """torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and its store's ``MASTER_ADDR``/``PORT``."""
    return LaunchEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        world_size=int(env["WORLD_SIZE"]),
        launched=True,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "0")),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        attempt_prefix=env.get("DDP_DEMO_SHARED_STORE") != "1",
        launcher="torchrun",
        error_file=env.get("TORCHELASTIC_ERROR_FILE") or None,
    )


# Every task of a job must agree on the store's port without talking to each other, so it is
# derived from the job id as Lightning does: 15000 + its last four digits
# (lightning/fabric/plugins/environments/slurm.py, SLURMEnvironment.main_port).
SLURM_PORT_BASE = 15000


def slurm_world_size(env: dict[str, str]) -> int:
    """The step's task count (``srun -n 2`` inside a bigger allocation), else the job's."""
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")


def srun_env(env: dict[str, str]) -> LaunchEnv:
    """srun's convention: ``SLURM_PROCID`` is the rank, ``SLURM_LOCALID`` the rank on its node.

    Nobody hosts a store for us, so rank 0 does (``agent_store`` False), on the first node
    of the step, where srun places task 0. ``MASTER_ADDR`` / ``MASTER_PORT`` override both.
    """
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
    per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    on_this_node = per_node[min(int(env.get("SLURM_NODEID", "0")), len(per_node) - 1)]
    port = env.get("MASTER_PORT") or SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % 10000
    return LaunchEnv(
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        world_size=slurm_world_size(env),
        launched=True,
        master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodes)[0],
        master_port=int(port),
        # torchrun's rule (torch/distributed/run.py): OMP_NUM_THREADS=1 when it is unset and a
        # node runs several processes, so that they do not fight over the same cores.
        threads=1 if "OMP_NUM_THREADS" not in env and on_this_node > 1 else None,
        launcher="srun",
    )


def export_threads(threads: int) -> None:
    """``OMP_NUM_THREADS`` for the processes this one starts, as torchrun exports it to its workers."""
    os.environ["OMP_NUM_THREADS"] = str(threads)


def report_to_launcher(env: LaunchEnv, line: str) -> None:
    """Leave the one line that says why this worker exits where torchrun's agent looks for it.

    torchrun's closing report (``ChildFailedError``, after its own traceback) shows, under "Root
    Cause", each failed worker's error file, the file ``TORCHELASTIC_ERROR_FILE`` names, or
    ``error_file: <N/A>`` when there is none (torch/distributed/elastic/multiprocessing/errors,
    ``ProcessFailure``; ``@record`` writes it for an uncaught exception, but bad input here exits
    with a status, not an exception). Written in that module's format, so the report's last lines
    repeat ours (issue 26). Every rank writes it, so the Root Cause shows it whichever rank it names.
    """
    if env.error_file is None:
        return
    message = {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}
    with contextlib.suppress(OSError):  # a report we cannot leave must not hide the exit status
        Path(env.error_file).write_text(json.dumps({"message": message}))
