"""The trainer as users run it: real torchrun, real files.

N = 2 runs under torchrun, the plain-python run as a command of its own; N = 1 and 4, the control
and the README's default job run the same ``main`` on ranks forked from a warm server
(tests/forked.py: what they prove is the trainer's, not the launcher's, and each torchrun
launch costs 3.5 s of CPU per process before it trains).

The runs record each rank's sample ids (``--record-samples``), so "the same result at every
N" cannot come from every rank redoing the whole batch: each step's batch must be split
into disjoint shares of B / N that make up the single process's batch.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ddp_demo import compare
from ddp_demo.core.tolerances import CONTROL_MARGIN, WHOLE_RUN

from .forked import ForkedRuns
from .helpers import (
    PYTHON,
    Command,
    compare_report,
    global_batches,
    load,
    max_diff,
    metrics,
    run_at_once,
)

FLAGS = ["--dtype", "float64", "--steps", "40", "--global-batch-size", "16", "--seed", "3", "--record-samples"]


JOB = [*FLAGS, "--model", "cnn"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone"]
LAUNCHES = {  # name: how python starts it, the job's flags
    "n2": ([*TORCHRUN, "--nproc_per_node=2"], [*JOB, "--log-all-ranks"]),
    "python": ([], JOB),  # plain python, no launcher
}
FORKED = {  # name: ranks, the job's flags
    "n1": (1, JOB),
    "n4": (4, JOB),  # 4 oversubscribes 2 cores: fine
    "nosync": (2, [*JOB, "--skip-grad-sync"]),  # the negative control
    "default": (2, []),  # the README's main job, no flags (test_readme.py runs it under torchrun as written)
}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every run of this file at once: the forked ones (FORKED), and the launches (LAUNCHES, by
    run_at_once); none depends on timing, so sharing the cores changes no
    result. ``{name: (out dir, process)}``."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in [*LAUNCHES, *FORKED]}
    forked = ForkedRuns({name: (n, [*flags, "--out", dirs[name]]) for name, (n, flags) in FORKED.items()}, dirs)
    commands = {name: Command([PYTHON, *launcher, "-m", "ddp_demo.train", *flags, "--out", str(dirs[name])],
                              dirs[name]) for name, (launcher, flags) in LAUNCHES.items()}
    try:
        launched = run_at_once(commands)
    finally:
        done = forked.wait()
    procs = launched | done
    return {name: (dirs[name], procs[name]) for name in dirs}


@pytest.fixture(scope="module")
def runs(launches):
    """The job at N = 1, 2 and 4: ``{n: (out dir, process)}``, each run to success."""
    out = {n: launches[f"n{n}"] for n in (1, 2, 4)}
    for _, proc in out.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_whole_run_is_world_size_invariant(runs, n):
    d1, d = runs[1][0], runs[n][0]
    assert max_diff(load(d / "final.pt"), load(d1 / "final.pt")) <= WHOLE_RUN
    losses = [[row["loss"] for row in metrics(x)] for x in (d1, d)]
    assert losses[0] == pytest.approx(losses[1], abs=WHOLE_RUN)
    assert global_batches(d, n, 16) == global_batches(d1, 1, 16)


def test_outputs_have_the_promised_shape(runs):
    d, proc = runs[2]
    state = load(d / "final.pt")
    assert state and not any(k.startswith("module.") for k in state)
    rows = metrics(d)
    assert [m["step"] for m in rows] == list(range(1, 41))
    assert all(set(m) == {"step", "loss", "samples_per_s", "sample_ids"} for m in rows)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["model"] == "cnn" and summary["launcher"] == "torchrun"
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0 and summary["params_identical_across_ranks"]
    assert summary["final_loss"] == rows[-1]["loss"]


def test_non_zero_ranks_stay_quiet(runs):
    _, proc = runs[4]
    assert proc.stdout.count("bit-identical parameters") == 1
    assert "[rank" not in proc.stdout


def test_log_all_ranks_prefixes_every_rank(runs):
    _, proc = runs[2]
    for rank in (0, 1):
        assert proc.stdout.count(f"[rank {rank}] device cpu, local rank {rank}") == 1, proc.stdout
    assert proc.stdout.count("bit-identical parameters") == 1  # the rest stays on rank 0


def test_plain_python_equals_torchrun(runs, launches):
    tmp_path, proc = launches["python"]
    assert proc.returncode == 0, proc.stderr
    assert max_diff(load(tmp_path / "final.pt"), load(runs[1][0] / "final.pt")) <= WHOLE_RUN
    assert global_batches(tmp_path, 1, 16) == global_batches(runs[1][0], 1, 16)
    assert json.loads((tmp_path / "summary.json").read_text())["launcher"] == "python"


@pytest.fixture(scope="module")
def control(launches):
    """The same job at N = 2 with --skip-grad-sync: it writes its outputs, then fails its check."""
    return launches["nosync"]


def test_negative_control_skipping_gradient_sync_is_caught(runs, control):
    d, proc = control
    assert proc.returncode != 0
    # printed once by rank 0 (torchrun's own report then quotes it from the error file: issue 26)
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("ddp_demo: error:")]
    assert len(said) == 1 and "ranks hold different parameters" in said[0], proc.stderr
    off = max_diff(load(d / "final.pt"), load(runs[1][0] / "final.pt"))
    assert off >= CONTROL_MARGIN * WHOLE_RUN, f"unsynced run missed by only {off:.3g}"
    assert json.loads((d / "summary.json").read_text())["params_identical_across_ranks"] is False


def test_compare_prints_the_runs_agree_and_the_control_does_not(runs, control, tmp_path, capsys):
    """ddp_demo.compare on the real runs (issue 15): N = 2 and 4 within 1e-10 of N = 1, the
    control at least 100 times that tolerance away."""
    dirs = [str(runs[n][0]) for n in (1, 2, 4)] + [str(control[0])]
    assert compare.main([*dirs, "--out", str(tmp_path / "proof.png")]) == 0
    printed = compare_report(capsys.readouterr().out)
    assert printed["N = 2, torchrun"]["largest"] <= WHOLE_RUN and printed["N = 4, torchrun"]["largest"] <= WHOLE_RUN
    assert printed["N = 2, torchrun, --skip-grad-sync"]["largest"] >= CONTROL_MARGIN * WHOLE_RUN


def test_default_run_learns(launches):
    """The README's main job: no flags, 2 CPU processes, >= 90% held-out accuracy."""
    d, proc = launches["default"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["heldout_accuracy"] >= 0.90
