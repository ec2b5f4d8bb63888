"""Sharded checkpoints resumed at another world size and under another strategy.

Two float64 Adam runs at N = 2 (zero, fsdp; sharded checkpoints every 2 steps) are SIGKILLed
after step 7 (``--inject-fault kill:1:7``), mid-epoch, so step 6's checkpoint is the newest; a
ddp run in this process stops at step 6. Copies of these are resumed by a few representative
pairs (the full matrix of world sizes and strategies is launch/reshard_matrix.sh): each must
end within WHOLE_RUN of one uninterrupted process, take its first 6 steps from the checkpoint,
and train every later step on the same global batch as that process, split evenly over its own
ranks. Runs at N = 1 run in this process (milliseconds); the killed runs under torchrun (its agent
stops the survivor), the resumed ones on ranks forked from a warm server (tests/forked.py).
51 training samples, global batch 12: 4 steps an epoch, so 10 steps cross two epoch boundaries.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ddp_demo.core.tolerances import CONTROL_MARGIN, WHOLE_RUN
from ddp_demo.resilience import checkpoint

from .forked import forked_runs
from .helpers import TORCHRUN, Command, continued_from, main_in_process, max_diff, metrics, run_at_once, small_data
from .test_sharded_checkpoint import nudged_copy

BASE = ["--dtype", "float64", "--global-batch-size", "12", "--optimizer", "adam", "--lr", "0.01", "--steps", "10",
        "--checkpoint-every", "2", "--keep-last", "20", "--checkpoint-format", "sharded", "--record-samples",
        "--timeout", "60"]
KILLED = ("zero", "fsdp")  # each at N = 2, killed after step 7
PAIRS = {  # name: (saved by, at world size, resumed by, at world size); N = 1 runs in this process
    "fsdp2-ddp1": ("fsdp", 2, "ddp", 1),
    "ddp1-fsdp3": ("ddp", 1, "fsdp", 3),  # fsdp reshards to 3 (fsdp 2 -> 3 and the rest: reshard_matrix.py)
    "fsdp2-zero2": ("fsdp", 2, "zero", 2),  # zero loads its own partition's optimizer state
    "zero2-zero1": ("zero", 2, "zero", 1),
}


def flags(data: Path, d: Path, strategy: str, *extra: str) -> list[str]:
    return [*BASE, "--data", str(data), "--strategy", strategy, "--out", str(d / "out"), "--checkpoint-dir",
            str(d / "ckpt"), *extra]


def torchrun(n: int, args: list[str], cwd: Path) -> Command:
    return Command([*TORCHRUN, "--standalone", f"--nproc_per_node={n}", "-m", "ddp_demo.train", *args], cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The reference (one process, in this process), the killed runs, then the resumed pairs."""
    d = tmp_path_factory.mktemp("reshard")
    data = small_data(d / "xy.pt")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert main_in_process([*BASE, "--data", data, "--out", d / "ref"], monkeypatch) == 0
        assert main_in_process(flags(data, d / "ddp", "ddp", "--steps", "6"), monkeypatch) == 0
    first = run_at_once({s: torchrun(2, flags(data, d / s, s, "--inject-fault", "kill:1:7"), d) for s in KILLED})
    logged = {}
    for name, (saved_by, _, _, _) in PAIRS.items():
        shutil.copytree(d / saved_by / "ckpt", d / name / "ckpt")
        logged[name] = checkpoint.load(d / name / "ckpt" / "step-000006")["logs"]
    second = forked_runs({name: (n, flags(data, d / name, s)) for name, (_, _, s, n) in PAIRS.items() if n > 1},
                         dict.fromkeys(PAIRS, d))
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, (_, _, s, n) in PAIRS.items():
            if n == 1:
                code = main_in_process(flags(data, d / name, s), monkeypatch)
                second[name] = subprocess.CompletedProcess([], code, "", "")
    return {"dir": d, "data": data, "first": first, "second": second, "logged": logged}


@pytest.mark.parametrize("strategy", KILLED)
def test_the_killed_runs_left_step_6(runs, strategy):
    assert runs["first"][strategy].returncode != 0  # SIGKILLed
    assert [p.name for p in checkpoint.checkpoints(runs["dir"] / strategy / "ckpt")][-1] == "step-000006"


@pytest.mark.parametrize("name", PAIRS)
def test_resumed_at_another_size_or_strategy_equals_one_process(runs, name):
    d, (_, before, _, after) = runs["dir"] / name, PAIRS[name]
    proc = runs["second"][name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert continued_from(d / "out", runs["logged"][name])  # resumed, not redone
    assert max_diff(d / "out" / "final.pt", runs["dir"] / "ref" / "final.pt") <= WHOLE_RUN
    reference = [sorted(sum(row["sample_ids"], [])) for row in metrics(runs["dir"] / "ref")]
    for row, batch in zip(metrics(d / "out"), reference, strict=True):
        shares = row["sample_ids"]
        ranks = before if row["step"] <= 6 else after
        assert [len(s) for s in shares] == [12 // ranks] * ranks, (row["step"], shares)
        assert sorted(sum(shares, [])) == batch  # the same global batch, no sample on two ranks


def test_each_sample_once_per_epoch_across_the_resume(runs):
    rows = metrics(runs["dir"] / "ddp1-fsdp3" / "out")
    for epoch in range(2):
        seen = [i for row in rows[4 * epoch: 4 * epoch + 4] for share in row["sample_ids"] for i in share]
        assert len(seen) == len(set(seen)) == 48


def test_control_a_changed_checkpoint_misses(runs, tmp_path):
    """The tolerance can fail: fsdp's step 6 with one weight moved by 0.5, resumed in one process."""
    nudged_copy(runs["dir"] / "fsdp" / "ckpt" / "step-000006", tmp_path / "ckpt" / "step-000006")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert main_in_process(flags(runs["data"], tmp_path, "fsdp"), monkeypatch) == 0
    miss = max_diff(tmp_path / "out" / "final.pt", runs["dir"] / "ref" / "final.pt")
    assert miss >= CONTROL_MARGIN * WHOLE_RUN, miss
