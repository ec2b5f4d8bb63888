"""``launch_env`` reads who started the process: torchrun, SLURM's ``srun``, or nobody.

It is a pure function of the environment, so each launcher's variables are given here as a
dict, copied from what torchrun and SLURM 22.05 set (tests/test_slurm.py runs the real thing).
SLURM's hostlists are expanded by hand and compared with ``scontrol show hostnames``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_demo.core.dist import setup
from ddp_demo.core.env import SLURM_PORT_BASE, LaunchEnv, launch_env, launch_variables, report_to_launcher
from ddp_demo.core.slurm import expand_counts, expand_hostlist

# What srun gives task 1 of `sbatch -N2 --ntasks-per-node=1` (job 12345678), and what the batch
# script around it sees (no SLURM_STEP_ID: the script is not a task of a step).
BATCH = {"SLURM_JOB_ID": "12345678", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NODELIST": "node[07-08]",
         "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURM_TASKS_PER_NODE": "1(x2)"}
SRUN_TASK_1 = {**BATCH, "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_PROCID": "1", "SLURM_NODEID": "1"}
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
            "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_ERROR_FILE": "/tmp/e/3/error.json"}


def test_no_launcher_is_one_process_on_one_thread():
    """Plain python gets the one intra-op thread each torchrun worker gets (core/env.py says why)."""
    assert launch_env({}) == LaunchEnv(threads=1)
    assert launch_env({"OMP_NUM_THREADS": "2"}) == LaunchEnv()  # the user's choice stands


def test_torchrun():
    assert launch_env(TORCHRUN) == LaunchEnv(rank=3, local_rank=1, world_size=4, launched=True,
                                             master_addr="10.0.0.1", master_port=29500, restart_count=2,
                                             agent_store=True, launcher="torchrun", error_file="/tmp/e/3/error.json")


def test_torchrun_inside_an_srun_step_wins():
    """launch/slurm.sbatch: srun starts torchrun, whose workers inherit srun's variables too."""
    assert launch_env({**SRUN_TASK_1, **TORCHRUN}) == launch_env(TORCHRUN)


def test_srun_task_two_nodes():
    env = launch_env(SRUN_TASK_1)
    assert env == LaunchEnv(rank=1, local_rank=0, world_size=2, launched=True, master_addr="node07",
                            master_port=SLURM_PORT_BASE + 5678, launcher="srun")  # threads None: one task per node
    assert SLURM_PORT_BASE == 15000  # Lightning's base: both pick the same port for the same job


def test_srun_two_tasks_on_one_node_sets_one_thread_as_torchrun_would():
    one_node = {**SRUN_TASK_1, "SLURM_STEP_NODELIST": "gpu5", "SLURM_STEP_TASKS_PER_NODE": "2",
                "SLURM_NODEID": "0", "SLURM_LOCALID": "1"}
    env = launch_env(one_node)
    assert (env.rank, env.local_rank, env.master_addr, env.threads) == (1, 1, "gpu5", 1)
    assert launch_env({**one_node, "OMP_NUM_THREADS": "4"}).threads is None  # the user's choice stands


def test_uneven_tasks_per_node_count_this_node():
    env = {**SRUN_TASK_1, "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
    assert launch_env({**env, "SLURM_NODEID": "0"}).threads == 1
    assert launch_env({**env, "SLURM_NODEID": "1"}).threads is None


def test_srun_master_addr_and_port_override():
    env = launch_env({**SRUN_TASK_1, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 23456)


def test_srun_step_smaller_than_the_job():
    """``srun -n 2`` inside a 4-task allocation: the world is the step's 2 tasks, not the job's 4."""
    env = launch_env({**SRUN_TASK_1, "SLURM_NTASKS": "4"})
    assert env.world_size == 2


@pytest.mark.parametrize("case", ["batch script", "one-task step"])
def test_negative_control_slurm_outside_a_multi_task_step_is_one_process(case):
    """The batch script sees SLURM_PROCID=0 and SLURM_NTASKS=2 but is no rank; an interactive
    ``srun --pty bash`` is a step of one task. Both must train alone instead of waiting for peers."""
    environ = BATCH if case == "batch script" else {**SRUN_TASK_1, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    assert launch_env(environ) == LaunchEnv(threads=1)


def test_threads_are_applied_at_setup(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # monkeypatch restores it afterwards
    try:
        setup(LaunchEnv(threads=1), device="cpu")  # world of one: no process group is created
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


HOSTLISTS = {  # SLURM's compressed form -> what `scontrol show hostnames` prints (SLURM 22.05)
    "node[01-03,07],gpu5": ["node01", "node02", "node03", "node07", "gpu5"],
    "n[9-10]": ["n9", "n10"],  # the padding is the first number's width
    "n[001-2]": ["n001", "n002"],
    "rack[1-2]n[1-2]": ["rack1n1", "rack1n2", "rack2n1", "rack2n2"],
    "127.0.0.[2-3]": ["127.0.0.2", "127.0.0.3"],  # tests/slurm.py names its nodes by address
    "a,b": ["a", "b"],
    "n[7]": ["n7"],
    "solo": ["solo"],
}


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_expand_hostlist(hostlist):
    assert expand_hostlist(hostlist) == HOSTLISTS[hostlist]


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[3-1]", "n[a-b]", ""])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_hostlist_agrees_with_scontrol(tmp_path):
    """The real thing: SLURM's own parser, which needs only a configuration file to run."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (apt-get install slurm-client), so there is nothing to compare with")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=check\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=ALL\n")
    for hostlist, expected in HOSTLISTS.items():
        proc = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "SLURM_CONF": str(conf)})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == expected == expand_hostlist(hostlist), hostlist


def test_expand_counts():
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert expand_counts("4") == [4]
    with pytest.raises(ValueError):
        expand_counts("2(x)")


# ---- core/env.py is the one reader of the environment -------------------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "ddp_demo"
READS_ENV = re.compile(r"\bos\s*\.\s*(environb?|getenvb?)\b|\bfrom\s+os\s+import\b[^\n]*\b(environb?|getenvb?)\b")
ALLOWED = {  # module -> why it may touch os.environ; anything else is a second reader
    "core/env.py": "the one reader of the launcher's environment (STYLE.md, principle 2), torch-free for the doctor",
    "bench/command.py": "hands its own environment on to the trainer runs it starts, reading no variable",
    "bench/launchers.py": "hands its own environment on to the launch scripts it times, reading no variable",
    "bench/gpu_check.py": "hands its own environment on to the commands it starts, reading no variable",
    "train_ray.py": "writes (never reads) the restart count Ray does not tell its workers, for core/dist.py to read",
}


def env_readers() -> set[str]:
    return {str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if READS_ENV.search(f.read_text())}


def test_only_core_env_reads_the_environment():
    """Every other module receives what env.py read (a LaunchEnv, launch_variables()) as a value; the doctor
    and core/dist.py included (issue 26: both read it themselves before)."""
    assert env_readers() <= set(ALLOWED), "os.environ is read outside core/env.py"
    assert set(ALLOWED) <= env_readers(), "an allowed module no longer reads it: drop it from ALLOWED"


@pytest.mark.parametrize("line, reads", [
    ('rank = int(os.environ["RANK"])', True), ("port = os.getenv('MASTER_PORT')", True),
    ("from os import environ", True), ("env = {**os.environ}", True),
    ('value = environ.get("NNODES", "")', False),  # a dict handed in, as doctor/plan.py takes it
])
def test_negative_control_the_grep_sees_a_read(line, reads):
    assert bool(READS_ENV.search(line)) == reads


def test_launch_variables_are_a_copy_of_the_environment_given():
    given = {"NNODES": "2", "RDZV_HOST": "10.0.0.1"}
    variables = launch_variables(given)
    assert variables == given and variables is not given


def test_the_doctor_reads_the_environment_without_torch():
    """core/env.py imports no torch, so the doctor (which answers before torch is even needed) can use it."""
    code = "import sys, ddp_demo.doctor.cli, ddp_demo.core.env; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert proc.stdout.strip() == "False", proc.stderr


def test_an_error_is_left_where_torchruns_report_shows_it(tmp_path):
    """torchrun's report reads a failed worker's error file (issue 26: bad input showed `<N/A>` there)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / "error.json"
    report_to_launcher(LaunchEnv(error_file=str(path)), "ddp_demo: error: --steps must be a positive integer")
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(path))
    assert failure.message["message"] == "ddp_demo: error: --steps must be a positive integer"
    report_to_launcher(LaunchEnv(), "nothing to write to")  # no launcher's file: nothing happens
