"""Training on a real SLURM cluster (tests/slurm.py), in both of SLURM's conventions.

* ``launch/slurm.sbatch``: srun starts one torchrun per node, torchrun starts the workers.
* plain ``srun python -m ddp_demo.train``: srun starts every worker, and ddp_demo reads
  ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` itself (core/dist.py).

Each on one node with 2 processes and on two (simulated) nodes with 1 each, submitted with
``sbatch`` all at once, and each must write the ``final.pt`` one process writes (float64,
within 1e-10); the two-node torchrun job trains under ``--strategy fsdp`` and the one-node srun
job under ``zero``, so the sharded strategies are proven across nodes and under plain srun too.
A job without gradient sync is the negative control, and the failing job: it
must end FAILED and say why in the worker's own line.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from ddp_demo.core.tolerances import WHOLE_RUN

from .helpers import PYTHON, ROOT, clean_env, load, max_diff, run_cmd
from .slurm import slurm_cluster

FLAGS = ["--dtype", "float64", "--steps", "6", "--global-batch-size", "16", "--seed", "5", "--model", "mlp"]
SBATCH = str(ROOT / "launch" / "slurm.sbatch")
CONTROL = "control: srun, 2 nodes x 1, no gradient sync"


def script(*flags: str):
    """The torchrun convention: launch/slurm.sbatch as the batch script, train flags after it."""
    return lambda out: [SBATCH, *flags, "--out", str(out)]


def srun(*flags: str):
    """The plain convention: a batch script of one line, srun starting ddp_demo on every task."""
    return lambda out: ["--wrap", shlex.join(["srun", "--kill-on-bad-exit=1", PYTHON, "-m", "ddp_demo.train",
                                              *flags, "--out", str(out)])]


JOBS = {  # name: (sbatch's options, the batch script given where to write, extra environment)
    "torchrun, 1 node x 2": (["--nodes=1"], script(*FLAGS, "--preflight"), {"NPROC_PER_NODE": "2"}),
    # The sharded strategies across nodes and under plain srun ride on two of the jobs (issue 21).
    "torchrun, 2 nodes x 1, fsdp": (["--nodes=2"], script(*FLAGS, "--preflight", "--strategy", "fsdp"), {}),
    "srun, 1 node x 2, zero": (["--nodes=1", "--ntasks-per-node=2"], srun(*FLAGS, "--strategy", "zero"), {}),
    "srun, 2 nodes x 1": (["--nodes=2", "--ntasks-per-node=1"], srun(*FLAGS), {}),
    # The negative control, and the failing job: the same as the one above with DDP's all-reduce off.
    "control: srun, 2 nodes x 1, no gradient sync": (["--nodes=2", "--ntasks-per-node=1"],
                                                      srun(*FLAGS, "--skip-grad-sync"), {}),
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict:
    """Every job at once, and the single-process reference beside them; the cluster is stopped after."""
    d = tmp_path_factory.mktemp("slurm")
    reference = subprocess.Popen([PYTHON, "-m", "ddp_demo.train", *FLAGS, "--out", str(d / "single")], cwd=d,
                                 env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with slurm_cluster() as cluster:
            submitted, logs = {}, {}
            for i, (name, (options, batch_script, env)) in enumerate(JOBS.items()):
                out, log = d / f"job{i}", d / f"job{i}.log"
                job_id = cluster.submit([f"--job-name=job{i}", *options, *batch_script(out)], log,
                                        {"PYTHON": PYTHON, **env}, cwd=ROOT)
                submitted[job_id], logs[job_id] = (name, out), log
            done = cluster.wait(logs, timeout=200)
        _, stderr = reference.communicate(timeout=120)
    finally:
        reference.kill()  # a no-op once it has exited
    assert reference.returncode == 0, stderr[-3000:]
    single = load(d / "single" / "final.pt")
    return {name: (done[job_id], out, single) for job_id, (name, out) in submitted.items()}


@pytest.mark.parametrize("name", [name for name in JOBS if name != CONTROL])
def test_job_equals_one_process(jobs, name):
    job, out, single = jobs[name]
    assert job.state == "COMPLETED" and job.exit_code == "0:0", job.report()
    assert job.output.count("training mlp on 2 process(es)") == 1  # one world of 2, and rank 0 speaks once
    strategy = name.split(", ")[2] if name.count(",") == 2 else "ddp"
    assert json.loads((out / "summary.json").read_text())["config"]["strategy"] == strategy
    if name.startswith("torchrun"):  # the launch doctor on every node, then the same checks in the workers
        nodes = 2 if "2 nodes" in name else 1
        assert job.output.count("checks passed") - job.output.count("preflight:") == nodes, job.output
    assert json.loads((out / "summary.json").read_text())["launcher"] == name.split(",")[0]
    diff = max_diff(load(out / "final.pt"), single)
    print(f"{name}: {job.state} in {job.wall_s:.1f} s from sbatch; max |final.pt - one process| = {diff:.3g}")
    assert diff <= WHOLE_RUN


def test_negative_control_without_gradient_sync_differs(jobs):
    """The same job with DDP's all-reduce off: the comparison above must be able to fail."""
    job, out, single = jobs[CONTROL]
    diff = max_diff(load(out / "final.pt"), single)
    print(f"control: {job.state} in {job.wall_s:.1f} s; max |final.pt - one process| = {diff:.3g}")
    assert diff >= 1e7 * WHOLE_RUN


def test_failed_job_reports_the_workers_one_line(jobs):
    """SLURM says FAILED and an exit code; the job's output says why, in the worker's words, once."""
    job, _, _ = jobs[CONTROL]
    print(job.report())
    # srun's --kill-on-bad-exit ends the rank still running (SIGTERM: 143) once the other exits 1
    assert job.state == "FAILED" and job.exit_code in ("1:0", "143:0")
    assert job.error_line() == ("ddp_demo: error: ranks hold different parameters after training: gradients were "
                                "not synchronised (--skip-grad-sync was given)")
    assert job.output.count("ddp_demo: error:") == 1  # rank 0 only, not once per rank
    assert job.error_line() in job.report()


def test_sbatch_script_outside_slurm_names_the_problem():
    proc = run_cmd([SBATCH], cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == "launch: not inside a SLURM job; submit this script with sbatch"
