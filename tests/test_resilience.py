"""Exact resume, elastic restarts, stop signals and lost peers — several processes, through the real CLI.

The job trains on a 64-sample file (51 train samples, global batch 16): 3 steps per
epoch, so 12 steps cross 3 epoch boundaries and "each sample once per epoch" is a
strong property. Training is deterministic, so "equal to the uninterrupted run" alone
would also hold if a resumed run redid everything: the resume tests that run the two
attempts themselves also check that the steps before the checkpoint were taken from it
(``continued_from``). Single-process checkpoint promises are in test_checkpoint.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ddp_demo.core.tolerances import WHOLE_RUN
from ddp_demo.resilience import checkpoint

from .forked import ForkedRuns, ranks_by_hand
from .helpers import (
    TORCHRUN,
    Command,
    clean_env,
    continued_from,
    global_batches,
    kill_session,
    max_diff,
    metrics,
    nudge_weights,
    rewrite_checkpoint,
    run_at_once,
    small_data,
    tensors,
)

STEPS = 12
# --timeout only ends a hang: room for ranks of one job started among several (run_at_once) on a loaded machine
BASE = ["--model", "mlp", "--dtype", "float64", "--global-batch-size", "16", "--checkpoint-every", "2",
        "--keep-last", "20", "--record-samples", "--timeout", "60"]


def job(data: Path, out: Path, ckpt: Path | None, *extra: str, steps: int = STEPS) -> list[str]:
    flags = [*BASE, "--data", str(data), "--steps", str(steps), "--out", str(out), *extra]
    return flags + (["--checkpoint-dir", str(ckpt)] if ckpt else [])


def launch(nproc: int, flags: list[str], cwd: Path, restarts: int = 0) -> Command:
    return Command([*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={restarts}",
                    "-m", "ddp_demo.train", *flags], cwd)


# Jobs that need torchrun's agent: it stops the survivors of a killed rank and restarts the group.
# The others run the same main on forked ranks (tests/forked.py), sharing the cores with these.
UNDER_TORCHRUN = ("killed", "elastic")


def round_at_once(jobs: dict[str, tuple[int, list[str], int]], dirs: dict[str, Path]) -> dict:
    """``{name: (processes, flags, torchrun's --max-restarts)}`` all at once: ``{name: process}``."""
    forked = ForkedRuns({name: (n, flags) for name, (n, flags, _) in jobs.items() if name not in UNDER_TORCHRUN},
                        dirs)
    try:
        launched = run_at_once({name: launch(n, flags, dirs[name], restarts)
                                for name, (n, flags, restarts) in jobs.items() if name in UNDER_TORCHRUN})
    finally:
        done = forked.wait()
    return launched | done


def same_bits(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def resumed_from(stdout: str) -> Path:
    """The checkpoint a run says it resumed from."""
    found = re.search(r"resuming from (\S+): step", stdout)
    assert found, stdout[-2000:]
    return Path(found[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory.mktemp("data") / "xy.pt")


# The first attempt of each job: processes, extra flags, steps, torchrun's --max-restarts.
FIRST = {
    "reference": (2, [], STEPS, 0),  # the uninterrupted run everything else must reproduce
    "killed": (2, ["--inject-fault", "kill:1:7"], STEPS, 0),
    "elastic": (2, ["--inject-fault", "kill:0:5"], STEPS, 2),  # both attempts inside this one command
    "2-1": (2, [], 6, 0),  # resumed below at another world size
    "1-2": (1, [], 6, 0),
    "damaged": (2, [], 8, 0),  # its newest checkpoint is damaged before the rerun
}
SECOND = {"killed": 2, "2-1": 1, "1-2": 2, "damaged": 2}  # the rerun of the whole job: processes


@dataclass
class Job:
    dir: Path  # the job's out/ and ckpt/ are in here
    first: subprocess.CompletedProcess
    out_after_first: bool  # whether the first attempt wrote out/
    logged: list[dict] | None = None  # the logs in step 6's checkpoint, read before the rerun (continued_from)
    damaged: Path | None = None  # the checkpoint damaged before the rerun
    second: subprocess.CompletedProcess | None = None


@pytest.fixture(scope="module")
def jobs(data, tmp_path_factory) -> dict[str, Job]:
    """Every job of the resume tests, in two rounds of jobs started at once (round_at_once):
    the first attempts (FIRST), then, after reading and damaging their checkpoints, the reruns
    (SECOND). Each result is a function of the job and its checkpoints, not of timing."""
    d = {name: tmp_path_factory.mktemp(name) for name in FIRST}
    first = round_at_once({name: (n, job(data, d[name] / "out", d[name] / "ckpt", *extra, steps=steps), restarts)
                           for name, (n, extra, steps, restarts) in FIRST.items()}, d)
    found = {name: Job(d[name], first[name], (d[name] / "out").exists()) for name in FIRST}
    for name in SECOND:
        between_attempts(found[name], damage=name == "damaged")
    second = round_at_once({name: (n, job(data, d[name] / "out", d[name] / "ckpt"), 0)
                            for name, n in SECOND.items()}, d)
    for name, proc in second.items():
        found[name].second = proc
    return found


def between_attempts(j: Job, damage: bool) -> None:
    """What a test reads or breaks between a job's two attempts (nothing, if the first wrote no checkpoint)."""
    saved = checkpoint.checkpoints(j.dir / "ckpt")
    if (j.dir / "ckpt" / "step-000006.pt").exists():
        j.logged = checkpoint.load(j.dir / "ckpt" / "step-000006.pt")["logs"]
    if damage and saved:
        j.damaged = saved[-1]
        rewrite_checkpoint(j.damaged, nudge_weights, checksum=False)  # loads fine; only the checksum tells


@pytest.fixture(scope="module")
def reference(jobs) -> Path:
    """The uninterrupted 2-process run everything else must reproduce."""
    proc = jobs["reference"].first
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jobs["reference"].dir


def test_every_sample_once_per_epoch(reference):
    batches = global_batches(reference / "out", 2, 16)  # and each step split into 2 disjoint halves
    assert len(batches) == STEPS
    for epoch in range(STEPS // 3):
        seen = sum(batches[3 * epoch : 3 * epoch + 3], [])
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(51))


def test_killed_run_resumes_bit_identical(jobs, reference):
    j = jobs["killed"]
    tmp_path, resumed = j.dir, j.second
    assert j.first.returncode != 0 and not j.out_after_first
    assert j.logged is not None, j.first.stderr[-3000:]
    logged = j.logged
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed.stdout) == tmp_path / "ckpt" / "step-000006.pt"
    assert continued_from(tmp_path / "out", logged)
    assert same_bits(tmp_path / "out" / "final.pt", reference / "out" / "final.pt")
    want, got = (checkpoint.load(checkpoint.checkpoints(d / "ckpt")[-1]) for d in (reference, tmp_path))
    want_t, got_t = tensors(want["optimizer"]), tensors(got["optimizer"])
    assert len(want_t) == len(got_t) > 0 and all(torch.equal(a, b) for a, b in zip(want_t, got_t, strict=True))
    assert _without_rate(metrics(tmp_path / "out")) == _without_rate(metrics(reference / "out"))


def _without_rate(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows]  # wall-clock differs


def test_elastic_restart_after_sigkill_is_bit_identical(jobs, reference):
    tmp_path, proc = jobs["elastic"].dir, jobs["elastic"].first
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout  # both attempts run inside this one command: the
    # proof that a resume continues rather than redoes is test_killed_run_resumes_bit_identical
    assert same_bits(tmp_path / "out" / "final.pt", reference / "out" / "final.pt")


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_matches_within_rounding(jobs, reference, before, after):
    j = jobs[f"{before}-{after}"]
    tmp_path, first, second, logged = j.dir, j.first, j.second, j.logged
    assert first.returncode == 0 and logged is not None, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "results match within float rounding" in second.stdout
    assert continued_from(tmp_path / "out", logged)
    assert max_diff(tmp_path / "out" / "final.pt", reference / "out" / "final.pt") <= WHOLE_RUN
    # the same global batches, split first over `before` ranks, then over `after`
    got = [[len(row["sample_ids"]), sorted(sum(row["sample_ids"], []))] for row in metrics(tmp_path / "out")]
    assert got == [[before if step < 6 else after, batch]
                   for step, batch in enumerate(global_batches(reference / "out", 2, 16))]


def test_damaged_newest_checkpoint_is_reported_once_and_skipped(jobs, reference):
    j = jobs["damaged"]
    tmp_path, newest, proc = j.dir, j.damaged, j.second
    assert j.first.returncode == 0 and newest is not None, j.first.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"skipping checkpoint {newest}: {newest.name} does not match its checksum") == 1
    assert resumed_from(proc.stdout) == tmp_path / "ckpt" / "step-000006.pt"
    assert same_bits(tmp_path / "out" / "final.pt", reference / "out" / "final.pt")


def wait_until(condition, seconds: float, what: str):
    """Poll ``condition()`` until it is truthy; fail the test, naming ``what``, after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {seconds:.0f} s waiting for {what}")
        time.sleep(0.05)
    return found


def test_sigterm_to_the_launcher_stops_cleanly_and_a_rerun_resumes(data, tmp_path, in_process):
    flags = job(data, tmp_path / "out", tmp_path / "ckpt", steps=10**6)
    proc = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ddp_demo.train", *flags],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:  # the signal only once a checkpoint exists: that is what the rerun resumes from
        wait_until(lambda: checkpoint.checkpoints(tmp_path / "ckpt"), 90, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_session(proc)
    assert proc.returncode != 0  # torchrun reports that it was signalled; its workers exit 128 + 15
    ours = [line for line in err.splitlines() if line.startswith("ddp_demo: error: stopped by a signal")]
    assert len(ours) == 1, err[-3000:]
    step = int(ours[0].split("after step ")[1].split(":")[0])
    assert checkpoint.load(checkpoint.checkpoints(tmp_path / "ckpt")[-1])["step"] == step
    rerun = in_process(*job(data, tmp_path / "out", tmp_path / "ckpt", steps=step + 3))
    assert rerun.returncode == 0 and f"step {step}," in rerun.stdout, rerun.stderr


def exit_code(rank, seconds: float) -> int | None:
    """A rank's exit code once it has ended, or None if it still runs after ``seconds``."""
    rank.join(seconds)
    return rank.exitcode


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(data, tmp_path):
    """Only rank 1 is signalled; rank 0 learns of it in the step's all-reduce and stops after
    the same step (had they stopped apart, rank 0 would wait in a collective and exit 1)."""
    flags = job(data, tmp_path / "out", tmp_path / "ckpt", "--log-all-ranks", steps=10**6)
    with ranks_by_hand(flags, tmp_path) as procs:
        wait_until(lambda: checkpoint.checkpoints(tmp_path / "ckpt"), 90, "the first checkpoint")
        os.kill(procs[1].pid, signal.SIGTERM)
        codes = [exit_code(p, 60) for p in procs]
    assert codes == [128 + signal.SIGTERM] * 2
    err = [(tmp_path / f"rank{r}.err").read_text() for r in (0, 1)]
    ours = re.findall(r"ddp_demo: error: stopped by a signal after step (\d+)", err[0])
    assert len(ours) == 1 and "ddp_demo: error" not in err[1], err  # said once, by rank 0
    assert checkpoint.load(checkpoint.checkpoints(tmp_path / "ckpt")[-1])["step"] == int(ours[0])
    for r in (0, 1):
        assert f"[rank {r}] device cpu, local rank {r}" in (tmp_path / f"rank{r}.out").read_text()


@pytest.mark.parametrize("kind, timeout", [("kill", 60), ("hang", 6)])
def test_survivor_exits_on_its_own_when_a_peer_is_lost(data, tmp_path, kind, timeout):
    """No launcher to clean up: rank 0 alone must notice and exit, naming the cause. A killed
    peer closes its connections, so rank 0 notices at once, long before ``--timeout``; a frozen
    (SIGSTOPped) one says nothing, so ``--timeout`` is what ends the wait."""
    flags = job(data, tmp_path / "out", None, "--timeout", str(timeout), "--inject-fault", f"{kind}:1:3",
                steps=10**6)
    log = tmp_path / "rank1.out"
    with ranks_by_hand(flags, tmp_path) as procs:
        wait_until(lambda: log.exists() and "injecting fault" in log.read_text(), 90, "the fault")
        struck = time.monotonic()
        code = exit_code(procs[0], timeout + 60)
        waited = time.monotonic() - struck
    print(f"{kind}: rank 0 exited {waited:.1f} s after the fault (--timeout {timeout})")  # shown by pytest -rA
    assert code == 1
    assert "lost contact with another rank" in (tmp_path / "rank0.err").read_text()
    if kind == "kill":
        assert waited < timeout / 2, waited
    else:  # the wait lasts --timeout, and ends soon after (exit and teardown; a loaded machine is slow)
        assert timeout - 1 <= waited <= timeout + 20, waited
