"""Checkpoints, exact resume, elastic restarts, stop signals and faults — through the real CLI.

The job trains on a 64-sample file (51 train samples, global batch 16): 3 steps per
epoch, so 12 steps cross 3 epoch boundaries and "each sample once per epoch" is a
strong property.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_demo.resilience import checkpoint

from .helpers import PYTHON, TORCHRUN, free_port, max_diff, run_cmd

STEPS = 12
BASE = ["--model", "mlp", "--dtype", "float64", "--global-batch-size", "16", "--checkpoint-every", "2",
        "--record-samples", "--timeout", "30"]


def job(data: Path, out: Path, ckpt: Path | None, *extra: str, steps: int = STEPS) -> list[str]:
    flags = [*BASE, "--data", str(data), "--steps", str(steps), "--out", str(out), *extra]
    return flags + (["--checkpoint-dir", str(ckpt)] if ckpt else [])


def launch(nproc: int, flags: list[str], cwd: Path, restarts: int = 0, timeout: float = 120):
    return run_cmd([*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={restarts}",
                    "-m", "ddp_demo.train", *flags], cwd, timeout)


def same_bits(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)



def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=g)
    path = tmp_path_factory.mktemp("data") / "xy.pt"
    torch.save((x, (x[:, 0] > 0).long()), path)
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run everything else must reproduce."""
    d = tmp_path_factory.mktemp("ref")
    proc = launch(2, job(data, d / "out", d / "ckpt"), d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_every_sample_once_per_epoch(reference):
    ids = [m["sample_ids"] for m in metrics(reference / "out")]
    assert len(ids) == STEPS
    for epoch in range(STEPS // 3):
        seen = sum(ids[3 * epoch : 3 * epoch + 3], [])
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(51))


def test_killed_run_resumes_bit_identical(data, reference, tmp_path):
    flags = job(data, tmp_path / "out", tmp_path / "ckpt")
    killed = launch(2, flags + ["--inject-fault", "kill:1:7"], tmp_path)
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    resumed = launch(2, flags, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 6" in resumed.stdout
    assert same_bits(tmp_path / "out" / "final.pt", reference / "out" / "final.pt")
    want, got = (checkpoint.load(checkpoint.checkpoints(d / "ckpt")[-1]) for d in (reference, tmp_path))
    want_t, got_t = _tensors(want["optimizer"]), _tensors(got["optimizer"])
    assert len(want_t) == len(got_t) > 0 and all(torch.equal(a, b) for a, b in zip(want_t, got_t, strict=True))
    assert _without_rate(metrics(tmp_path / "out")) == _without_rate(metrics(reference / "out"))


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def _without_rate(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows]  # wall-clock differs


def test_elastic_restart_after_sigkill_is_bit_identical(data, reference, tmp_path):
    proc = launch(2, job(data, tmp_path / "out", tmp_path / "ckpt", "--inject-fault", "kill:0:5"), tmp_path,
                  restarts=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert same_bits(tmp_path / "out" / "final.pt", reference / "out" / "final.pt")


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_matches_within_rounding(data, reference, tmp_path, before, after):
    flags = job(data, tmp_path / "out", tmp_path / "ckpt")
    first = launch(before, job(data, tmp_path / "out", tmp_path / "ckpt", steps=6), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(after, flags, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "results match within float rounding" in second.stdout
    assert max_diff(tmp_path / "out" / "final.pt", reference / "out" / "final.pt") <= 1e-10
    assert [m["sample_ids"] for m in metrics(tmp_path / "out")] == [m["sample_ids"] for m in metrics(reference / "out")]


def test_corrupted_newest_checkpoint_is_reported_and_skipped(data, reference, tmp_path):
    flags = job(data, tmp_path / "out", tmp_path / "ckpt")
    assert launch(2, job(data, tmp_path / "out", tmp_path / "ckpt", steps=8), tmp_path).returncode == 0
    newest = checkpoint.checkpoints(tmp_path / "ckpt")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    proc = launch(2, flags, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"skipping checkpoint {newest}") == 1
    assert "step 6" in proc.stdout
    assert same_bits(tmp_path / "out" / "final.pt", reference / "out" / "final.pt")


def _single(flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cmd([PYTHON, "-m", "ddp_demo.train", *flags], cwd, timeout=120)


def _one_line(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_no_valid_checkpoint_is_an_error(data, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step-000004.pt").write_bytes(b"garbage")
    proc = _single(job(data, tmp_path / "out", tmp_path / "ckpt"), tmp_path)
    assert proc.returncode == 2 and "none is valid" in proc.stderr and not (tmp_path / "out").exists()


def test_checkpoint_from_another_model_is_refused(data, tmp_path):
    assert _single(job(data, tmp_path / "a", tmp_path / "ckpt", steps=2), tmp_path).returncode == 0
    torch.save((torch.randn(64), torch.randn(64)), tmp_path / "reg.pt")
    flags = job(tmp_path / "reg.pt", tmp_path / "out", tmp_path / "ckpt") + ["--model", "multiply"]
    _one_line(_single(flags, tmp_path), "--model", "--resume never")
    assert not (tmp_path / "out").exists()


def test_checkpoint_cannot_run_code(data, tmp_path):
    """weights_only=True: a pickle that would run a command is refused, even with a valid checksum."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "ckpt" / "step-000002.pt"
    path.parent.mkdir()
    torch.save({"model": Evil()}, path)
    (tmp_path / "ckpt" / "step-000002.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    proc = _single(job(data, tmp_path / "out", tmp_path / "ckpt"), tmp_path)
    assert proc.returncode == 2 and not marker.exists()


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_unwritable_directory(data, tmp_path, flag):
    (tmp_path / "file").write_text("x")
    flags = job(data, tmp_path / "out", tmp_path / "ckpt") + [flag, str(tmp_path / "file" / "sub")]
    _one_line(_single(flags, tmp_path), flag)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    flags = job(data, tmp_path / "out", tmp_path / "ckpt", "--dtype", "float32", "--lr", "1e30",
                "--checkpoint-every", "1")
    proc = _single(flags, tmp_path)  # float32 with this lr: the loss is nan at step 2
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "the loss is" in line and "at step" in line and "kept in" in line
    assert not (tmp_path / "out").exists()
    good = checkpoint.load(checkpoint.checkpoints(tmp_path / "ckpt")[-1])
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def test_sigterm_to_the_launcher_stops_cleanly_and_a_rerun_resumes(data, tmp_path):
    flags = job(data, tmp_path / "out", tmp_path / "ckpt", steps=10**6)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ddp_demo.train", *flags],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not checkpoint.checkpoints(tmp_path / "ckpt") and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("ddp_demo: error: stopped by a signal")]
    assert len(ours) == 1, err[-3000:]
    step = int(ours[0].split("after step ")[1].split(":")[0])
    last = checkpoint.checkpoints(tmp_path / "ckpt")[-1]
    assert checkpoint.load(last)["step"] == step
    rerun = _single(job(data, tmp_path / "out", tmp_path / "ckpt", steps=step + 3), tmp_path)
    assert rerun.returncode == 0 and f"step {step}," in rerun.stdout, rerun.stderr


@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_survivor_exits_within_timeout_when_a_peer_is_lost(data, tmp_path, kind):
    """No launcher to clean up: rank 0 alone must notice and exit, naming the cause."""
    timeout = 5
    flags = job(data, tmp_path / "out", None, "--timeout", str(timeout), "--inject-fault", f"{kind}:1:3",
                steps=10**6)
    base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "ddp_demo.train", *flags], cwd=tmp_path,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    assert elapsed < timeout + 25, elapsed  # start-up plus the collective timeout, not forever
    assert "lost contact with another rank" in err, err[-2000:]
