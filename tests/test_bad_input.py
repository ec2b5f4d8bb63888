"""Bad input: one clear line naming the flag and the fix, once, exit 2, nothing written.

Most cases call ``ddp_demo.train.main`` in this process (validation happens before any
process group exists, so nothing else differs); one case and the torchrun cases go
through real subprocesses, where import-time warnings would show up too (started at once:
each costs seconds of imports and stops at validation).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ddp_demo.core.config import ConfigError, parse_config

from .helpers import PYTHON, ROOT, Command, assert_one_clear_line, run_at_once, torchrun, torchrun_args


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


TORCHRUN_CASES = {  # name: (processes, flags, the flag the line must name)
    "batch": (2, ["--global-batch-size", "63"], "--global-batch-size"),  # needs the world size torchrun sets
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The real command lines of this file, started at once (run_at_once): each stops at
    validation, and none depends on timing. ``{name: (out dir it must not write, process)}``."""
    d = {name: tmp_path_factory.mktemp("bad") for name in (*TORCHRUN_CASES, "python")}
    commands = {name: Command(torchrun_args(n, "ddp_demo.train", *flags, "--out", str(d[name] / "out")), d[name])
                for name, (n, flags, _) in TORCHRUN_CASES.items()}
    commands["python"] = Command([PYTHON, "-m", "ddp_demo.train", "--model", "resnet", "--out",
                                  str(d["python"] / "out")], d["python"])
    procs = run_at_once(commands)
    return {name: (d[name] / "out", procs[name]) for name in commands}


def test_single_process_command_line(launched):
    """The real command: exactly one line on stderr (no import-time warnings either)."""
    out, proc = launched["python"]
    assert_one_clear_line(proc, "--model", out)


def test_negative_control_good_input_writes_outputs(tmp_path, in_process):
    torch.save((torch.randn(64, 10), torch.randint(0, 3, (64,))), tmp_path / "good.pt")
    out = tmp_path / "out"
    proc = in_process("--data", tmp_path / "good.pt", "--steps", "3", "--global-batch-size", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "final.pt").exists()


@pytest.mark.parametrize("case", ["batch"])  # the parser's own refusals print the same way (the python case)
def test_under_torchrun_printed_once_by_rank_zero(case, launched):
    out, proc = launched[case]
    flag = TORCHRUN_CASES[case][2]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ddp_demo: error: ")]
    assert len(ours) == 1 and flag in ours[0], proc.stderr
    # torchrun's report names the first worker to exit (code 2); it may stop the other before it exits itself
    assert "exitcode  : 2" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not out.exists()


def test_batch_fix_is_named(launched):
    assert "use a multiple of 2, e.g. --global-batch-size 62" in launched["batch"][1].stderr
    with pytest.raises(ConfigError, match="use a multiple of 4, e.g. --global-batch-size 28"):
        parse_config(["--global-batch-size", "30"]).check_batch_split(4)  # what 4 torchrun ranks would print


@pytest.mark.parametrize("how", ["wait", "exit"])
def test_the_reporting_rank_is_not_stopped_before_it_reports(how):
    """torchrun stops every worker once one has exited. A silent rank that exits first must not
    take the reporting rank with it: the ranks wait for its mark in the agent's store. Control:
    without the wait, rank 0 is stopped and the job fails with no reason given."""
    proc = torchrun(2, "tests.slow_speaker", how, cwd=ROOT, timeout=60)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ddp_demo: error: ")]
    assert proc.returncode != 0
    assert ours == (["ddp_demo: error: bad input, reported once"] if how == "wait" else []), proc.stderr
