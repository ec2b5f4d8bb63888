"""Bad input: one clear line naming the flag and the fix, once, exit 2, nothing written.

Most cases call ``ddp_demo.train.main`` in this process (validation happens before any
process group exists, so nothing else differs); one case and the torchrun cases go
through real subprocesses, where import-time warnings would show up too.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import ROOT, assert_one_clear_line, torchrun, train


def _bad_files(d):
    (d / "text.pt").write_text("not a torch file")
    torch.save({"x": torch.randn(4)}, d / "dict.pt")
    torch.save((torch.randn(20, 3), torch.zeros(20, dtype=torch.long)), d / "shape.pt")
    torch.save((torch.randn(20, 10), torch.zeros(7, dtype=torch.long)), d / "length.pt")


CASES = {
    "unknown model": (["--model", "resnet"], "--model"),
    "unknown dtype": (["--dtype", "float16"], "--dtype"),
    "unknown wrapper": (["--ddp", "horovod"], "--ddp"),
    "zero steps": (["--steps", "0"], "--steps"),
    "negative steps": (["--steps", "-3"], "--steps"),
    "steps not a number": (["--steps", "ten"], "--steps"),
    "missing data file": (["--data", "{d}/missing.pt"], "--data"),
    "data not a torch file": (["--data", "{d}/text.pt"], "--data"),
    "data not a tuple": (["--data", "{d}/dict.pt"], "--data"),
    "data wrong shape for model": (["--data", "{d}/shape.pt", "--model", "cnn"], "--data"),
    "data lengths differ": (["--data", "{d}/length.pt"], "--data"),
    "fp16 on the cpu": (["--precision", "fp16", "--device", "cpu"], "--precision"),
    "bf16 with float64": (["--precision", "bf16", "--dtype", "float64"], "--precision"),
    "unknown precision": (["--precision", "fp8"], "--precision"),
    "log every zero": (["--log-every", "0"], "--log-every"),
}


@pytest.mark.parametrize("name", CASES)
def test_each_bad_input(name, tmp_path, in_process):
    _bad_files(tmp_path)
    flags, flag = CASES[name]
    out = tmp_path / "out"
    proc = in_process(*[f.format(d=tmp_path) for f in flags], "--out", out)
    assert_one_clear_line(proc, flag, out)


def test_single_process_command_line(tmp_path):
    """The real command: exactly one line on stderr (no import-time warnings either)."""
    out = tmp_path / "out"
    assert_one_clear_line(train("--model", "resnet", "--out", str(out), cwd=tmp_path), "--model", out)


def test_negative_control_good_input_writes_outputs(tmp_path, in_process):
    torch.save((torch.randn(64, 10), torch.randint(0, 3, (64,))), tmp_path / "good.pt")
    out = tmp_path / "out"
    proc = in_process("--data", tmp_path / "good.pt", "--steps", "3", "--global-batch-size", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "final.pt").exists()


@pytest.mark.parametrize("flags, flag", [
    (["--global-batch-size", "63"], "--global-batch-size"),
    (["--model", "resnet"], "--model"),
])
def test_under_torchrun_printed_once_by_rank_zero(flags, flag, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(2, "ddp_demo.train", *flags, "--out", str(out), cwd=tmp_path)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ddp_demo: error: ")]
    assert len(ours) == 1 and flag in ours[0], proc.stderr
    # torchrun's report names the first worker to exit (code 2); it may stop the other before it exits itself
    assert "exitcode  : 2" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not out.exists()


def test_batch_fix_is_named(tmp_path):
    proc = torchrun(4, "ddp_demo.train", "--global-batch-size", "30", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert "use a multiple of 4, e.g. --global-batch-size 28" in proc.stderr


@pytest.mark.parametrize("how", ["wait", "exit"])
def test_the_reporting_rank_is_not_stopped_before_it_reports(how):
    """torchrun stops every worker once one has exited. A silent rank that exits first must not
    take the reporting rank with it: the ranks wait for its mark in the agent's store. Control:
    without the wait, rank 0 is stopped and the job fails with no reason given."""
    proc = torchrun(2, "tests.slow_speaker", how, cwd=ROOT, timeout=60)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ddp_demo: error: ")]
    assert proc.returncode != 0
    assert ours == (["ddp_demo: error: bad input, reported once"] if how == "wait" else []), proc.stderr
