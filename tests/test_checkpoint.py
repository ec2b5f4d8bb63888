"""Checkpoint promises, one single-process run after another in this process (milliseconds each).

A resumed run must depend on the checkpoint's content and continue where it stopped; a
checkpoint from another setup, a damaged one and one that would run code are refused;
``--keep-last`` prunes; ``--resume PATH`` takes that file. The multi-process paths (a
killed rank, an elastic restart, another world size, signals) are in test_resilience.py.
The job: 51 training samples, global batch 16, so 3 steps an epoch and 12 steps cross 3 epochs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from ddp_demo.resilience import checkpoint

from .helpers import (
    assert_one_clear_line,
    continued_from,
    main_in_process,
    max_diff,
    nudge_weights,
    rewrite_checkpoint,
    tensors,
)

STEPS = 12
# a checkpoint every 2 steps, none pruned unless a test asks
BASE = ["--dtype", "float64", "--global-batch-size", "16", "--checkpoint-every", "2", "--keep-last", "20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A classification file for mlp and a regression file for multiply (64 samples each)."""
    d, g = tmp_path_factory.mktemp("data"), torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=g)
    torch.save((x, (x[:, 0] > 0).long()), d / "xy.pt")
    torch.save((x + 1, (x[:, 1] > 0).long()), d / "other.pt")
    r = torch.randn(64, generator=g)
    torch.save((r, 3 * r + 0.01 * torch.randn(64, generator=g)), d / "reg.pt")
    return {"mlp": d / "xy.pt", "other": d / "other.pt", "multiply": d / "reg.pt"}


def job(data, d: Path, model: str = "mlp", optimizer: str = "sgd", steps: int = STEPS, ckpt: bool = True) -> list:
    flags = [*BASE, "--model", model, "--optimizer", optimizer, "--data", data[model], "--steps", steps,
             "--out", d / "out"]
    return flags + (["--checkpoint-dir", d / "ckpt"] if ckpt else [])


SETUPS = [("mlp", "sgd"), ("mlp", "adam"), ("multiply", "sgd"), ("multiply", "adam")]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The runs every resume must reproduce, by (model, optimizer): 12 steps, a checkpoint every 2."""
    runs = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for model, optimizer in SETUPS:
            d = tmp_path_factory.mktemp(f"{model}-{optimizer}")
            assert main_in_process(job(data, d, model, optimizer), monkeypatch) == 0
            runs[(model, optimizer)] = d
    return runs


@pytest.mark.parametrize("model, optimizer", SETUPS)
def test_stopped_and_resumed_run_is_bit_identical(data, uninterrupted, tmp_path, in_process, model, optimizer):
    ref = uninterrupted[(model, optimizer)]
    assert in_process(*job(data, tmp_path, model, optimizer, steps=6)).returncode == 0
    logged = checkpoint.load(tmp_path / "ckpt" / "step-000006.pt")["logs"]
    resumed = in_process(*job(data, tmp_path, model, optimizer))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout and "step 6," in resumed.stdout
    assert max_diff(tmp_path / "out" / "final.pt", ref / "out" / "final.pt") == 0
    assert continued_from(tmp_path / "out", logged)
    want, got = (checkpoint.load(d / "ckpt" / "step-000012.pt")["optimizer"] for d in (ref, tmp_path))
    assert tensors(want) and len(tensors(want)) == len(tensors(got))
    assert all(torch.equal(a, b) for a, b in zip(tensors(want), tensors(got), strict=True))


def test_the_resumed_result_depends_on_the_checkpoint(data, uninterrupted, tmp_path, in_process):
    """Training is deterministic, so redoing the work from scratch would also match the
    uninterrupted run: a checkpoint whose weights were changed (checksum updated) must
    change the result."""
    ref = uninterrupted[("mlp", "sgd")]
    assert in_process(*job(data, tmp_path, steps=6)).returncode == 0
    rewrite_checkpoint(tmp_path / "ckpt" / "step-000006.pt", nudge_weights)
    resumed = in_process(*job(data, tmp_path))
    assert resumed.returncode == 0 and "step 6," in resumed.stdout, resumed.stderr
    assert max_diff(tmp_path / "out" / "final.pt", ref / "out" / "final.pt") > 1e-2


def test_resume_path_takes_that_checkpoint(data, uninterrupted, tmp_path, in_process):
    ref = uninterrupted[("mlp", "sgd")]
    older = ref / "ckpt" / "step-000004.pt"  # not the newest: --resume auto would take step 12
    resumed = in_process(*job(data, tmp_path, ckpt=False), "--resume", older)
    assert resumed.returncode == 0 and f"resuming from {older}: step 4," in resumed.stdout, resumed.stderr
    assert max_diff(tmp_path / "out" / "final.pt", ref / "out" / "final.pt") == 0
    assert continued_from(tmp_path / "out", checkpoint.load(older)["logs"])  # not rewritten: no --checkpoint-dir


def test_resume_path_that_does_not_exist_is_one_line(data, tmp_path, in_process):
    proc = in_process(*job(data, tmp_path), "--resume", tmp_path / "missing.pt")
    assert_one_clear_line(proc, "--resume", tmp_path / "out", "no such file")


def test_resume_never_starts_fresh(data, uninterrupted, tmp_path, in_process):
    ref = uninterrupted[("mlp", "sgd")]
    assert in_process(*job(data, tmp_path, steps=6)).returncode == 0
    rewrite_checkpoint(tmp_path / "ckpt" / "step-000006.pt", nudge_weights)  # would change the result if it were read
    fresh = in_process(*job(data, tmp_path), "--resume", "never")
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout
    assert max_diff(tmp_path / "out" / "final.pt", ref / "out" / "final.pt") == 0


def test_keep_last_prunes_to_the_newest(data, tmp_path, in_process):
    proc = in_process(*job(data, tmp_path, steps=5), "--checkpoint-every", "1", "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-000004.pt", "step-000004.pt.sha256", "step-000005.pt", "step-000005.pt.sha256"]


def test_checksum_mismatch_and_missing_checksum_are_refused(tmp_path):
    path = checkpoint.save(str(tmp_path), 2, {"model": {"w": torch.zeros(3)}}, keep_last=5)
    assert checkpoint.load(path)["model"]["w"].tolist() == [0, 0, 0]  # the control: it loads as written
    rewrite_checkpoint(path, nudge_weights, checksum=False)  # a valid torch file, not the one its checksum is of
    with pytest.raises(ValueError, match="does not match its checksum"):
        checkpoint.load(path)
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(ValueError, match="has no checksum file"):
        checkpoint.load(path)


def test_damaged_newest_checkpoints_are_skipped(data, uninterrupted, tmp_path, in_process):
    """Step 8 altered after its checksum was written, step 6 without its checksum: both are
    reported once and the run resumes from step 4, bit-identical."""
    ref = uninterrupted[("mlp", "sgd")]
    assert in_process(*job(data, tmp_path, steps=8)).returncode == 0
    ckpt = tmp_path / "ckpt"
    rewrite_checkpoint(ckpt / "step-000008.pt", nudge_weights, checksum=False)
    (ckpt / "step-000006.pt.sha256").unlink()
    proc = in_process(*job(data, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(f"skipping checkpoint {ckpt / 'step-000008.pt'}: step-000008.pt does not match") == 1
    assert proc.stderr.count(f"skipping checkpoint {ckpt / 'step-000006.pt'}: step-000006.pt has no checksum") == 1
    assert "step 4," in proc.stdout
    assert max_diff(tmp_path / "out" / "final.pt", ref / "out" / "final.pt") == 0


def test_no_valid_checkpoint_is_an_error(data, tmp_path, in_process):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step-000004.pt").write_bytes(b"garbage")
    proc = in_process(*job(data, tmp_path))
    assert proc.returncode == 2 and "none is valid" in proc.stderr and not (tmp_path / "out").exists()


# every setting a checkpoint must share with the run resuming it, and a run that differs in it
MISMATCH = {
    "model": ["--model", "multiply", "--data", "{multiply}"],
    "dtype": ["--dtype", "float32"],
    "optimizer": ["--optimizer", "adam"],
    "seed": ["--seed", "1"],
    "global_batch_size": ["--global-batch-size", "8"],
    "data": ["--data", "{other}"],
    "grad_accum_steps": ["--grad-accum-steps", "2"],
}


def test_every_setting_that_must_match_is_tested():
    assert set(MISMATCH) == set(checkpoint.MUST_MATCH)


@pytest.mark.parametrize("setting", MISMATCH)
def test_checkpoint_from_another_setup_is_refused(data, tmp_path, in_process, setting):
    assert in_process(*job(data, tmp_path, steps=2)).returncode == 0
    other = [str(f).format(**data) for f in MISMATCH[setting]]
    proc = in_process(*job(data, tmp_path), "--out", tmp_path / "out2", *other)
    assert_one_clear_line(proc, "--" + setting.replace("_", "-"), tmp_path / "out2", "--resume never")


def test_checkpoint_cannot_run_code(data, tmp_path, in_process):
    """weights_only=True: a pickle that would run a command is refused, even with a valid checksum."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "ckpt" / "step-000002.pt"
    path.parent.mkdir()
    torch.save({"model": Payload()}, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    proc = in_process(*job(data, tmp_path))
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
    torch.load(path, weights_only=False)  # the control: read without weights_only, the payload runs
    assert marker.exists()


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_unwritable_directory(data, tmp_path, in_process, flag):
    (tmp_path / "file").write_text("x")
    proc = in_process(*job(data, tmp_path), flag, tmp_path / "file" / "sub")
    assert_one_clear_line(proc, flag, tmp_path / "out")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, in_process):
    proc = in_process(*job(data, tmp_path), "--dtype", "float32", "--lr", "1e30", "--checkpoint-every", "1")
    assert proc.returncode == 1, proc.stderr  # float32 with this lr: the loss is nan at step 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "the loss is nan at step 2" in line and "checkpoint of step 1 kept in" in line, line
    assert not (tmp_path / "out").exists()
    good = checkpoint.load(checkpoint.checkpoints(tmp_path / "ckpt")[-1])
    assert good["step"] == 1 and all(torch.isfinite(t).all() for t in good["model"].values())
