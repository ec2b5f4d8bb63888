"""Sharded checkpoints (resilience/sharded.py), one process at a time in this process.

The promises of one-file checkpoints, kept for the DCP directories: an exact resume that depends
on what was saved, complete-or-absent (a writer killed before the rename leaves nothing that is
read), verified before use, ``--keep-last``, settings that must match, nothing that runs code,
and the offline conversion both ways. Resharding across world sizes and strategies is in
test_resharding.py. The job: 51 training samples, global batch 16, 12 steps over 3 epochs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ddp_demo import checkpoint as convert
from ddp_demo.resilience import checkpoint, sharded

from .helpers import PYTHON, ROOT, assert_one_clear_line, clean_env, continued_from, max_diff, small_data

BASE = ["--dtype", "float64", "--global-batch-size", "16", "--checkpoint-every", "2", "--keep-last", "20",
        "--optimizer", "adam", "--checkpoint-format", "sharded"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory.mktemp("data") / "xy.pt")


def job(data: Path, d: Path, steps: int = 12, *extra) -> list:
    return [*BASE, "--data", data, "--steps", steps, "--out", d / "out", "--checkpoint-dir", d / "ckpt", *extra]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    from .helpers import main_in_process

    d = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert main_in_process(job(data, d), monkeypatch) == 0
    return d


def test_layout_on_disk(uninterrupted):
    step = uninterrupted / "ckpt" / "step-000006"
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "__0_0.distcp", "manifest.json", "meta.pt"]
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["format"] == sharded.FORMAT and set(manifest["files"]) == {".metadata", "__0_0.distcp", "meta.pt"}


def test_stopped_and_resumed_is_bit_identical(data, uninterrupted, tmp_path, in_process):
    assert in_process(*job(data, tmp_path, 6)).returncode == 0
    logged = checkpoint.load(tmp_path / "ckpt" / "step-000006")["logs"]
    resumed = in_process(*job(data, tmp_path))
    assert resumed.returncode == 0 and "step-000006: step 6," in resumed.stdout, resumed.stderr
    assert max_diff(tmp_path / "out" / "final.pt", uninterrupted / "out" / "final.pt") == 0
    assert continued_from(tmp_path / "out", logged)


@pytest.mark.parametrize("strategy", ["zero", "fsdp"])
def test_a_one_file_checkpoint_resumes_under_zero_and_fsdp(data, uninterrupted, tmp_path, in_process, strategy):
    """ddp's one file, read by name into the optimizer zero and fsdp build while wrapping."""
    assert in_process(*job(data, tmp_path, 6), "--checkpoint-format", "file").returncode == 0
    resumed = in_process(*job(data, tmp_path), "--strategy", strategy, "--checkpoint-format", "auto")
    assert resumed.returncode == 0 and "step-000006.pt: step 6," in resumed.stdout, resumed.stderr
    assert max_diff(tmp_path / "out" / "final.pt", uninterrupted / "out" / "final.pt") == 0
    assert (tmp_path / "ckpt" / "step-000012").is_dir()  # and it goes on in its own format


def nudged_copy(source: Path, target: Path) -> None:
    """``source`` with its first weight moved by 0.5, as a sharded checkpoint that verifies."""
    one = target.with_name(target.name + "-nudged.pt")  # not a checkpoint name: never resumed from
    one.parent.mkdir(parents=True, exist_ok=True)
    convert.to_file(source, one)
    whole = checkpoint.load(one)
    name = next(iter(whole["model"]))
    whole["model"][name] = whole["model"][name] + 0.5
    checkpoint.write_file(one, whole)
    convert.to_sharded(one, target)


def test_the_resumed_result_depends_on_the_checkpoint(data, uninterrupted, tmp_path, in_process):
    """The control of the test above: a resume that redid the work would also match."""
    nudged_copy(uninterrupted / "ckpt" / "step-000006", tmp_path / "step-000006")
    resumed = in_process(*job(data, tmp_path, 12, "--resume", tmp_path / "step-000006"))
    assert resumed.returncode == 0, resumed.stderr
    assert max_diff(tmp_path / "out" / "final.pt", uninterrupted / "out" / "final.pt") > 1e-2


def test_conversion_both_ways_keeps_every_tensor(uninterrupted, tmp_path):
    source = uninterrupted / "ckpt" / "step-000012"
    assert convert.main(["to-file", str(source), str(tmp_path / "one.pt")]) == 0
    assert convert.main(["to-file", str(source), str(tmp_path / "final.pt"), "--model-only"]) == 0
    assert convert.main(["to-sharded", str(tmp_path / "one.pt"), str(tmp_path / "back")]) == 0
    assert max_diff(tmp_path / "final.pt", uninterrupted / "out" / "final.pt") == 0  # final.pt's format
    (a, meta_a), (b, meta_b) = sharded.read_full(source), sharded.read_full(tmp_path / "back")
    flat = {f"{n}.{k}": v for n, s in a["optim"]["state"].items() for k, v in s.items()}
    assert flat and max_diff(a["model"], b["model"]) == 0
    assert max_diff(flat, {f"{n}.{k}": v for n, s in b["optim"]["state"].items() for k, v in s.items()}) == 0
    assert meta_a["logs"] == meta_b["logs"] and meta_a["param_groups"] == meta_b["param_groups"]


def test_keep_last_prunes_directories(data, tmp_path, in_process):
    assert in_process(*job(data, tmp_path, 5, "--checkpoint-every", "1", "--keep-last", "2")).returncode == 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000004", "step-000005"]


KILL_BEFORE_RENAME = """
import os, signal, sys
from ddp_demo import train
from ddp_demo.resilience import sharded
sharded.commit = lambda tmp, final: os.kill(os.getpid(), signal.SIGKILL)  # the shards are on disk, no rename yet
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_writer_killed_mid_save_leaves_no_checkpoint(data, uninterrupted, tmp_path, in_process):
    """SIGKILL after DCP wrote the shards of step 8, before the rename: step 6 stays the newest."""
    ck = tmp_path / "ckpt"
    assert in_process(*job(data, tmp_path, 6)).returncode == 0
    killed = subprocess.run([PYTHON, "-c", KILL_BEFORE_RENAME, *map(str, job(data, tmp_path, 8))], cwd=ROOT,
                            env=clean_env({"PYTHONPATH": str(ROOT)}), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9 and (ck / "step-000008.partial" / "__0_0.distcp").exists(), killed.stderr
    assert [p.name for p in checkpoint.checkpoints(ck)] == ["step-000002", "step-000004", "step-000006"]
    resumed = in_process(*job(data, tmp_path))
    assert resumed.returncode == 0 and "step-000006: step 6," in resumed.stdout, resumed.stderr
    assert not (ck / "step-000008.partial").exists()  # the next save cleared it
    assert max_diff(tmp_path / "out" / "final.pt", uninterrupted / "out" / "final.pt") == 0


def broken_copy(uninterrupted: Path, d: Path, how: str) -> Path:
    """A copy of step 6, damaged ``how``; the manifest and the rest untouched unless said."""
    convert.to_file(uninterrupted / "ckpt" / "step-000006", d / "one.pt")
    convert.to_sharded(d / "one.pt", step := d / "ckpt" / "step-000006")
    shard = step / "__0_0.distcp"
    if how == "missing-shard":
        shard.unlink()
    elif how == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "newer-format":
        manifest = json.loads((step / "manifest.json").read_text())
        (step / "manifest.json").write_text(json.dumps({**manifest, "format": sharded.FORMAT + 1}))
    elif how == "another-model":  # another model's index (and a manifest that agrees): only the shapes tell
        other = d / "other"
        torch.manual_seed(0)
        sharded.write(other, {"model": {"linear1.weight": torch.zeros(3, 3)}}, {"params": []}, is_main=True)
        (step / ".metadata").write_bytes((other / ".metadata").read_bytes())
        sharded.commit(step, step.with_name("tmp"))
        step.with_name("tmp").rename(step)
    return step


BAD = {  # how: what the one line must say
    "missing-shard": "__0_0.distcp is missing",
    "truncated-shard": "__0_0.distcp does not match its checksum",
    "newer-format": "newer than this ddp_demo's",
    "another-model": "holds another model: linear1.bias is absent there, of shape [",
}


@pytest.mark.parametrize("how", BAD)
def test_bad_checkpoint_is_one_line_and_nothing_is_overwritten(data, uninterrupted, tmp_path, in_process, how):
    step = broken_copy(uninterrupted, tmp_path, how)
    before = {p.name: p.read_bytes() for p in step.iterdir()}
    proc = in_process(*job(data, tmp_path, 12, "--resume", step))
    assert_one_clear_line(proc, "", tmp_path / "out", BAD[how])
    assert {p.name: p.read_bytes() for p in step.iterdir()} == before and not (tmp_path / "ckpt2").exists()
    if how != "another-model":  # the converter refuses it too (the model check needs a model)
        assert convert.main(["to-file", str(step), str(tmp_path / "x.pt")]) == 2
        assert not (tmp_path / "x.pt").exists()


def test_newer_format_is_not_skipped_under_resume_auto(data, uninterrupted, tmp_path, in_process):
    """Skipping it would resume an older one (step 4 is there) and, with --keep-last, prune the newer one later."""
    broken_copy(uninterrupted, tmp_path, "newer-format")
    shutil.copytree(uninterrupted / "ckpt" / "step-000004", tmp_path / "ckpt" / "step-000004")
    proc = in_process(*job(data, tmp_path))
    assert_one_clear_line(proc, "--resume never", tmp_path / "out", "newer than this ddp_demo's")


def test_world_size_and_strategy_need_not_match():
    assert "world_size" not in checkpoint.MUST_MATCH and "strategy" not in checkpoint.MUST_MATCH


def test_another_setup_is_refused_in_one_line(data, uninterrupted, tmp_path, in_process):
    step = uninterrupted / "ckpt" / "step-000006"
    proc = in_process(*job(data, tmp_path, 12, "--resume", step, "--seed", "3"))
    assert_one_clear_line(proc, "--seed", tmp_path / "out", "--resume never")


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", [".metadata", "meta.pt"])
def test_a_checkpoint_cannot_run_code(data, uninterrupted, tmp_path, in_process, where):
    """DCP reads .metadata with plain pickle.load; ddp_demo's reader allows DCP's classes only."""
    step = broken_copy(uninterrupted, tmp_path, "none")
    marker = tmp_path / "ran"
    (step / where).write_bytes(pickle.dumps(Payload(marker)) if where == ".metadata" else b"")
    if where == "meta.pt":
        torch.save({"x": Payload(marker)}, step / where)
    sharded.commit(step, step.with_name("tmp"))  # checksums that agree: only the reader stands in the way
    step.with_name("tmp").rename(step)
    proc = in_process(*job(data, tmp_path, 12, "--resume", step))
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
    if where == ".metadata":  # the control: DCP's own reader runs it
        import torch.distributed.checkpoint as dcp

        with pytest.raises(AttributeError):  # what os.system returned is no Metadata
            dcp.FileSystemReader(str(step)).read_metadata()
        assert marker.exists()
