"""A real SLURM cluster for the tests: ``munged``, ``slurmctld`` and two ``slurmd`` on this machine.

The two nodes are two ``slurmd -N`` daemons, each on its own port (SLURM's "multiple slurmd"
set-up), named by their addresses 127.0.0.2 and 127.0.0.3 so that a task resolves the first
node's name with no /etc/hosts entry. They share this machine's network namespace: this is a
test of SLURM's conventions, not of cross-host addressing (tests/test_multinode.py is).

Everything lives in a temporary folder (configuration, munge key and socket, state, spool,
logs); the test's own ``SLURM_CONF`` points at it, so nothing of the machine's is touched.
The daemons are this process's children, run in the foreground and stopped by PID.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import clean_env, free_port

NODES = ("127.0.0.2", "127.0.0.3")
CPUS_PER_NODE = 8  # more than this machine has (SlurmdParameters=config_overrides): every test job runs at once
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}
INSTALL = "apt-get install slurmctld slurmd slurm-client munge"


@dataclass(frozen=True)
class Job:
    """A finished job, as ``scontrol show job`` and its output file tell it."""

    id: int
    state: str
    exit_code: str  # SLURM's "status:signal", e.g. "0:0"
    output: str
    wall_s: float  # from sbatch to the end, as seen by polling

    def error_line(self) -> str | None:
        """The worker's one-line error (``ddp_demo: error: ...``), if it printed one."""
        return next((line for line in self.output.splitlines() if line.startswith("ddp_demo: error:")), None)

    def report(self) -> str:
        """What a user needs from a failed job: its state and the worker's own words, not just FAILED."""
        return f"job {self.id} {self.state} (exit {self.exit_code}): {self.error_line() or self.output[-1500:]}"


@dataclass(frozen=True)
class Cluster:
    base: Path
    env: dict[str, str]  # SLURM_CONF, for the client commands and (exported by sbatch) the jobs

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=clean_env(self.env), capture_output=True, text=True, timeout=timeout)

    def submit(self, args: list[str], output: Path, env: dict[str, str], cwd: Path) -> int:
        """``sbatch`` with the caller's environment (exported to the job); returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", f"--output={output}", "--time=5", *args], cwd=cwd,
                              env=clean_env({**self.env, **env}), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch {' '.join(args)}: {proc.stderr}"
        return int(proc.stdout.split(";")[0])

    def wait(self, jobs: dict[int, Path], timeout: float) -> dict[int, Job]:
        """Poll until every job has ended; at ``timeout`` cancel them all and fail with their output."""
        start, done = time.monotonic(), {}
        while len(done) < len(jobs):
            for job_id, fields in self.jobs().items():
                if job_id in jobs and job_id not in done and fields.get("JobState") in ENDED:
                    out = jobs[job_id].read_text() if jobs[job_id].exists() else ""
                    done[job_id] = Job(job_id, fields["JobState"], fields.get("ExitCode", "?"), out,
                                       time.monotonic() - start)
            if time.monotonic() - start > timeout:
                self.run("scancel", *map(str, jobs))
                tails = [f"--- job {i} ---\n{p.read_text()[-1500:] if p.exists() else ''}" for i, p in jobs.items()]
                raise AssertionError(f"SLURM jobs still running after {timeout:g} s:\n" + "\n".join(tails))
            time.sleep(0.3)
        return done

    def jobs(self) -> dict[int, dict[str, str]]:
        """Every job the controller knows, one ``Key=Value`` line each (``scontrol -o``)."""
        proc = self.run("scontrol", "-o", "show", "job")
        found = {}
        for line in proc.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                found[int(fields["JobId"])] = fields
        return found


def why_not() -> str | None:
    """Why no SLURM cluster can be started here, or None."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing); as root: {INSTALL}"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs, and these tests do not"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no munge user (the munge package creates it)"
    return None


def first_job_id() -> int:
    """A first job id whose ports (15000 + id % 10000, the jobs' own choice) are free now.

    A fresh controller would number its jobs 1, 2, ..., so two clusters started at once (two
    test sessions) would pick the same ports; a random start keeps them apart.
    """
    for _ in range(100):
        first = random.randrange(10_000, 99_000, 100)
        if all(_port_free(15000 + (first + i) % 10000) for i in range(20)):
            return first
    raise OSError("no run of 20 free ports found above 15000")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_config(base: Path) -> dict[str, str]:
    """The cluster's slurm.conf: no cgroups, no accounting, everything under ``base``."""
    ports = [free_port() for _ in range(1 + len(NODES))]
    nodes = "\n".join(f"NodeName={n} NodeAddr={n} Port={p} CPUs={CPUS_PER_NODE}"
                      for n, p in zip(NODES, ports[1:], strict=True))
    (base / "slurm.conf").write_text(f"""\
ClusterName=ddpdemo
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports[0]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
# No cgroups here: processes are tracked through /proc, tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
FirstJobId={first_job_id()}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=10 State=UP
""")
    return {"SLURM_CONF": str(base / "slurm.conf")}


def start_munged(base: Path) -> subprocess.Popen:
    """munged as the munge user, with a fresh key and its socket in ``base/munge`` (which it must own)."""
    munge = base / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    user = pwd.getpwnam("munge")
    for path in (munge, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    return _daemon(["munged", "--foreground", f"--socket={munge}/munge.socket", f"--key-file={key}",
                    f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                    f"--seed-file={munge}/munged.seed"], base / "munged.out", {}, user="munge")


def _daemon(args: list[str], log: Path, env: dict[str, str], user: str | None = None) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=clean_env(env), stdout=out, stderr=subprocess.STDOUT, user=user,
                                start_new_session=True)


def _logs(base: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-1200:]}" for p in sorted(base.glob("*.*"))
                     if p.suffix in (".log", ".out"))


def wait_until_idle(cluster: Cluster, procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """Until ``sinfo`` shows every node idle. A daemon that exits at once means SLURM cannot run
    here (a skip, with its words); one that runs but never gets its nodes idle is a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            pytest.skip(f"SLURM is installed but {dead[0].args[0]} exited at start here:\n{_logs(cluster.base)}")
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
        if states.count("idle") == len(NODES):
            return
        time.sleep(0.2)
    raise AssertionError(f"SLURM nodes not idle after {timeout:g} s:\n{_logs(cluster.base)}")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 10) -> None:
    """Until a daemon has made ``path`` (its socket); the next daemon needs it at start."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each daemon by its PID, newest first; SIGKILL what is still alive 10 s later."""
    for p in reversed(procs):
        with suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="ddp-slurm-"))
    base.chmod(0o755)  # munged runs as the munge user and must reach its socket in here
    procs: list[subprocess.Popen] = []
    try:
        for sub in ("state", "spool"):
            (base / sub).mkdir()
        cluster = Cluster(base, write_config(base))
        procs.append(start_munged(base))
        _wait_for(base / "munge" / "munge.socket", procs[0])
        procs.append(_daemon(["slurmctld", "-D"], base / "slurmctld.out", cluster.env))
        procs += [_daemon(["slurmd", "-D", "-N", n], base / f"slurmd-{n}.out", cluster.env) for n in NODES]
        wait_until_idle(cluster, procs)
        yield cluster
    finally:
        stop(procs)
        shutil.rmtree(base, ignore_errors=True)
