"""Two-host elastic jobs for the membership tests and launch/soak_membership.sh: start the nodes,
change the membership mid-run, and read back what each node printed and when.

Each job runs launch/multinode.sh on two hosts (tests/nodes.py). The change comes at a known
step: ``--inject-fault pause:R:S`` holds rank R after step S, whose checkpoint then exists, until
its agent stops it or ``--timeout`` passes. A scenario waits for that checkpoint file and changes
the membership there, instead of racing a run that might already be over. Every wait has the
scenario's deadline; past it the scenario fails with the nodes' last lines, and whatever still
runs on its hosts is killed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import PYTHON, max_diff, small_data
from .nodes import MULTINODE, Host, node_env

STEPS, AT = 12, 6  # 51 training samples at a global batch of 16: 3 steps an epoch, 4 epochs; the change at 6
POLL_S = 0.05


def train_flags(data: Path, steps: int = STEPS) -> list[str]:
    """What every node (and the reference run) is given: float64, so rounding is all that differs."""
    return ["--model", "mlp", "--dtype", "float64", "--global-batch-size", "16", "--seed", "5", "--data", str(data),
            "--steps", str(steps), "--checkpoint-every", "3", "--record-samples"]


write_data = small_data  # the resume tests' data file (tests/helpers.py)


def sample_ids(out: Path) -> list[list[int]]:
    """Each step's global batch (the sorted union of the ranks' shares ``--record-samples`` logged
    in metrics.jsonl): the same at every world size when the samples agree."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [sorted(i for share in json.loads(line)["sample_ids"] for i in share) for line in lines]


def once_per_epoch(ids: list[list[int]], per_epoch: int = 3) -> bool:
    epochs = [sum(ids[i : i + per_epoch], []) for i in range(0, len(ids), per_epoch)]
    return all(len(seen) == len(set(seen)) == 16 * per_epoch for seen in epochs)


def trained_alike(out: Path, reference: Path) -> float:
    """The max difference of ``out``'s weights from ``reference``'s, once the samples agree:
    the same global batch at every step, and each sample once per epoch."""
    assert sample_ids(out) == sample_ids(reference) and once_per_epoch(sample_ids(out)), out
    return max_diff(out / "final.pt", reference / "final.pt")


def start_store(host: Host, port: int, log: Path) -> subprocess.Popen:
    """``python -m ddp_demo.rendezvous`` on ``host``, its output to ``log``."""
    with open(log, "w") as out:  # the child keeps its own copy
        return subprocess.Popen(host.cmd(PYTHON, "-m", "ddp_demo.rendezvous", "--host", host.addr, "--port", str(port)),
                                env=node_env({}), stdout=out, stderr=subprocess.STDOUT)


def at_the_store(store: Host, port: int, addr: str) -> bool:
    """``addr`` holds a connection to the store: that node's agent is in the rendezvous."""
    found = subprocess.run(store.cmd("ss", "-Htn", "state", "established", f"( sport = :{port} )"),
                           capture_output=True, text=True, timeout=30)
    return f"{addr}:" in found.stdout


# torchrun's rendezvous settings (--rdzv-conf); docs/elastic.md gives each one's share of the wait.
RDZV = {"join_timeout": 60, "last_call_timeout": 1, "close_timeout": 10, "keep_alive_interval": 1,
        "keep_alive_max_attempt": 3}


def elastic_env(nnodes: str = "1:2", restarts: int = 3, **rdzv: int) -> dict[str, str]:
    conf = ",".join(f"{k}={v}" for k, v in {**RDZV, **rdzv}.items())
    return {"NNODES": nnodes, "MAX_RESTARTS": str(restarts), "RDZV_CONF": conf}


@dataclass
class Outcome:
    """What a scenario's nodes left behind, and the durations it measured (seconds)."""

    codes: list[int | None]
    stdout: list[str]
    stderr: list[str]
    out: Path
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def timeline(self) -> list[int]:
        """The world size of each attempt, in order, as global rank 0 (on node 0, which sorts first) logged it."""
        return [int(n) for n in re.findall(r"^training \w+ on (\d+) process", self.stdout[0], re.M)]

    @property
    def changes(self) -> list[str]:
        return re.findall(r"^world size \d+ -> \d+ at step .*$", self.stdout[0], re.M)


class Job:
    """One job of launch/multinode.sh on two hosts; node 0 hosts the rendezvous store, or
    ``store``, a host that trains nothing, does (python -m ddp_demo.rendezvous, started by the caller)."""

    def __init__(self, hosts: tuple[Host, ...], workdir: Path, flags: list[str], env: dict[str, str],
                 budget_s: float, store: Host | None = None):
        self.hosts, self.dir, self.env, self.store = hosts, workdir, env, store or hosts[0]
        self.flags = [*flags, "--out", str(workdir / "out"), "--checkpoint-dir", str(workdir / "ckpt")]
        self.deadline, self.started = time.monotonic() + budget_s, time.monotonic()
        self.port = self.store.free_port()
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, node: int, flags: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        """Start node ``node``'s agent, with ``flags`` and ``env`` added to the job's; its output
        goes to files (appended to, when the node starts again), read while it runs."""
        host = self.hosts[node]
        env = {"RDZV_HOST": self.store.addr, "RDZV_PORT": str(self.port), "NODE_RANK": str(node),
               "LOCAL_ADDR": host.addr, "GLOO_SOCKET_IFNAME": host.ifname, **self.env, **(env or {})}
        logs = [open(self.dir / f"node{node}.{kind}", "a") for kind in ("out", "err")]  # noqa: SIM115
        with logs[0], logs[1]:  # the child keeps its own copies
            cmd = host.cmd(MULTINODE, *self.flags, *flags)
            self.procs[node] = subprocess.Popen(cmd, cwd=self.dir, env=node_env(env),
                                                stdout=logs[0], stderr=logs[1], start_new_session=True)

    def output(self, node: int, stream: str = "out") -> str:
        path = self.dir / f"node{node}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, what: str, ready: Callable[[], bool]) -> float:
        """Poll until ``ready()``; return when (time.monotonic()), or fail at the deadline."""
        while not ready():
            if time.monotonic() > self.deadline:
                tails = "\n".join(f"--- node {n} ---\n{self.output(n)[-1500:]}\n{self.output(n, 'err')[-2500:]}"
                                  for n in self.procs)
                raise AssertionError(f"{self.dir.name}: no {what} after {time.monotonic() - self.started:.0f} s\n"
                                     + tails)
            time.sleep(POLL_S)
        return time.monotonic()

    def checkpoint(self, step: int | None = None) -> float:
        """When the checkpoint of ``step`` (None: of any step) is complete: a file's checksum is written
        last; a sharded checkpoint's directory gets its name (and so its manifest) in one rename."""
        stem = "step-*" if step is None else f"step-{step:06d}"
        names = (f"{stem}.pt.sha256", f"{stem}/manifest.json")
        return self.wait_for(f"checkpoint {stem}", lambda: any(any((self.dir / "ckpt").glob(n)) for n in names))

    def lost_contact(self, node: int) -> float:
        return self.wait_for(f"lost-contact line from node {node}", lambda: "lost contact" in self.output(node, "err"))

    def resumed(self, node: int = 0) -> float:
        """When a new attempt has restored the checkpoint (global rank 0, on ``node``, says so)."""
        return self.wait_for("resumed attempt", lambda: "resuming from" in self.output(node))

    def exited(self, node: int) -> float:
        return self.wait_for(f"exit of node {node}", lambda: self.procs[node].poll() is not None)

    def outcome(self, **seconds: float) -> Outcome:
        nodes = sorted(self.procs)
        return Outcome([self.procs[n].poll() for n in nodes], [self.output(n) for n in nodes],
                       [self.output(n, "err") for n in nodes], self.dir / "out",
                       {k: round(v, 2) for k, v in seconds.items()})

    def close(self) -> None:
        for host in self.hosts:
            host.power_off()


def scenario(run: Callable[[Job], dict[str, float]]) -> Callable[..., Outcome]:
    """A scenario body gets a started-up Job and returns its measured durations; this makes it an
    ``Outcome``, and kills whatever it left running when it fails."""

    def wrapped(hosts: tuple[Host, Host], workdir: Path, flags: list[str], env: dict[str, str],
                budget_s: float = 180, **where: int) -> Outcome:
        workdir.mkdir(parents=True, exist_ok=True)
        job = Job(hosts, workdir, flags, env, budget_s)
        try:
            return job.outcome(**run(job, **where))
        finally:
            job.close()

    wrapped.__name__ = wrapped.__qualname__ = run.__name__
    return wrapped


@scenario
def leave(job: Job, at: int = AT) -> dict[str, float]:
    """Node 1 is powered off once the checkpoint of ``at`` exists (flags: pause:1:at)."""
    job.start(0)
    job.start(1)
    job.checkpoint(at)
    killed = time.monotonic()
    job.hosts[1].power_off()
    return {"kill to node 0's lost-contact line": job.lost_contact(0) - killed,
            "kill to the resumed attempt": job.resumed() - killed, "kill to node 0's exit": job.exited(0) - killed}


@scenario
def replace(job: Job, at: int = AT) -> dict[str, float]:
    """As ``leave``, then a new agent starts on node 1 at once: a replacement machine. Its restart
    count (0) differs from node 0's (1), which a store shared across rounds does not survive."""
    job.start(0)
    job.start(1)
    job.checkpoint(at)
    killed = time.monotonic()
    job.hosts[1].power_off()
    job.start(1)
    return {"kill to node 0's exit": job.exited(0) - killed, "kill to node 1's exit": job.exited(1) - killed}


@scenario
def join(job: Job, at: int = AT) -> dict[str, float]:
    """Node 1 starts once node 0, alone, has the checkpoint of ``at`` (flags: pause:0:at)."""
    job.start(0)
    begun = job.checkpoint(at)
    job.start(1)
    grown = job.resumed()
    return {"node 1's start to the grown attempt": grown - begun, "node 1's start to the exits":
            max(job.exited(0), job.exited(1)) - begun}


@scenario
def cut_for_good(job: Job) -> dict[str, float]:
    """The link goes down once a checkpoint exists (the run is endless: no pause is needed) and
    stays down until both workers gave up and node 0 exited; node 1's agent, cut off from the
    store on node 0, waits for the link."""
    job.start(0)
    job.start(1)
    job.checkpoint()
    job.hosts[1].link(False)
    cut = time.monotonic()
    seconds = {f"cut to node {n}'s lost-contact line": job.lost_contact(n) - cut for n in (0, 1)}
    seconds["cut to node 0's exit"] = job.exited(0) - cut
    job.hosts[1].link(True)
    seconds["cut to link back"] = time.monotonic() - cut
    seconds["cut to node 1's exit"] = job.exited(1) - cut
    return seconds


@scenario
def cut_and_restore(job: Job, at: int = AT) -> dict[str, float]:
    """The link goes down after the checkpoint of ``at`` (flags: pause:1:at) and comes back once
    node 0's worker gave up; the agents restart their workers and the job goes on."""
    job.start(0)
    job.start(1)
    job.checkpoint(at)
    job.hosts[1].link(False)
    cut = time.monotonic()
    gave_up = job.lost_contact(0)
    job.hosts[1].link(True)
    back = time.monotonic()
    return {"cut to node 0's lost-contact line": gave_up - cut, "cut to link back": back - cut,
            "cut to the resumed attempt": job.resumed() - cut,
            "cut to the exits": max(job.exited(0), job.exited(1)) - cut}
