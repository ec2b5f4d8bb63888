"""The trainer under ``--strategy zero`` and ``--strategy fsdp``: real processes, real files.

Whole runs at N = 2 and 4 in float64 must give one process's ``final.pt`` (same keys, plain
tensors: the format DDP's has) within WHOLE_RUN. The controls train with ``--skip-grad-sync``,
which each strategy honours its own way (zero: DDP's no_sync; fsdp: a reduce-scatter that
reduces nothing, strategy.OwnGradient): their ``final.pt`` must miss by CONTROL_MARGIN times
the tolerance. All runs start at once: none depends on timing. Their ranks run the trainer's
``main`` forked from a warm server (tests/forked.py: the strategies, not the launcher, are what
is tested here); the README's ``torchrun ... --strategy fsdp`` runs under torchrun itself.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ddp_demo import train_accelerate
from ddp_demo.core.tolerances import CONTROL_MARGIN, WHOLE_RUN

from .forked import forked_runs
from .helpers import LAUNCH_VARS, assert_one_clear_line, load, max_diff

JOB = ["--dtype", "float64", "--steps", "8", "--global-batch-size", "16", "--seed", "5", "--optimizer", "adam",
       "--lr", "0.01"]
LAUNCHES = {  # name: (processes, extra flags); 0 processes: plain python, the reference
    "one": (0, []),
    "zero2": (2, ["--strategy", "zero"]),
    "zero4": (4, ["--strategy", "zero", "--ddp", "scratch"]),
    "fsdp2": (2, ["--strategy", "fsdp", "--grad-accum-steps", "2"]),
    "fsdp4": (4, ["--strategy", "fsdp"]),
    "zero_nosync": (2, ["--strategy", "zero", "--skip-grad-sync"]),
    "fsdp_nosync": (2, ["--strategy", "fsdp", "--skip-grad-sync"]),
}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in LAUNCHES}
    procs = forked_runs({name: (n, [*JOB, *flags, "--out", dirs[name]]) for name, (n, flags) in LAUNCHES.items()},
                         dirs, timeout=400)
    return {name: (dirs[name], procs[name]) for name in LAUNCHES}


def diff_to_one(launches, name: str) -> float:
    return max_diff(load(launches[name][0] / "final.pt"), load(launches["one"][0] / "final.pt"))


@pytest.mark.parametrize("name", ["zero2", "zero4", "fsdp2", "fsdp4"])
def test_whole_run_equals_one_process(launches, name):
    out, proc = launches[name]
    assert proc.returncode == 0 and launches["one"][1].returncode == 0, proc.stderr[-3000:]
    assert set(load(out / "final.pt")) == set(load(launches["one"][0] / "final.pt"))  # no prefixes, no shards
    assert diff_to_one(launches, name) <= WHOLE_RUN
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_identical_across_ranks"] and summary["config"]["strategy"] == name[:4]
    assert proc.stdout.count("bit-identical parameters") == 1  # rank 0 only


@pytest.mark.parametrize("name", ["zero_nosync", "fsdp_nosync"])
def test_control_without_gradient_reduction_misses(launches, name):
    """Neither strategy's ranks end up holding different parameters: zero broadcasts each rank's
    share after its step, fsdp's shards are one copy. So the run's own check passes (exit 0) and
    only the comparison with one process sees that the gradients were never averaged."""
    out, proc = launches[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert diff_to_one(launches, name) >= CONTROL_MARGIN * WHOLE_RUN


REFUSED = {  # name: (flags, the flag the one line must name)
    "zero-file-checkpoints": (["--strategy", "zero", "--checkpoint-format", "file", "--checkpoint-dir", "{d}/ck"],
                              "--checkpoint-format"),
    "fsdp-file-checkpoints": (["--strategy", "fsdp", "--checkpoint-format", "file"], "--checkpoint-format"),
    "fsdp-scratch-checkpoints": (["--strategy", "fsdp", "--ddp", "scratch", "--checkpoint-dir", "{d}/ck"],
                                 "--ddp scratch"),
    "fsdp-fp16": (["--strategy", "fsdp", "--precision", "fp16"], "--precision"),
    "unknown-strategy": (["--strategy", "zero3"], "--strategy"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_in_one_line(name, tmp_path, in_process):
    flags, flag = REFUSED[name]
    out = tmp_path / "out"
    assert_one_clear_line(in_process(*[f.format(d=tmp_path) for f in flags], "--out", out), flag, out)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("flags, flag, fix", [(["--strategy", "fsdp"], "--strategy", "torchrun"),
                                              (["--checkpoint-format", "sharded"], "--checkpoint-format", "drop")])
def test_accelerate_refuses_sharding_in_one_line(tmp_path, monkeypatch, capsys, flags, flag, fix):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    code = train_accelerate.main([*flags, "--out", str(out)])
    captured = capsys.readouterr()
    assert_one_clear_line(subprocess.CompletedProcess([], code, captured.out, captured.err), flag, out, fix)
