"""The trainer as users run it: real torchrun, real files."""

from __future__ import annotations

import json

import pytest

from ddp_demo import compare

from .helpers import compare_report, load, max_diff, torchrun, train

FLAGS = ["--dtype", "float64", "--steps", "40", "--global-batch-size", "16", "--seed", "3"]




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job at N = 1, 2 and 4 under torchrun (4 oversubscribes 2 cores: fine)."""
    out = {}
    for n in (1, 2, 4):
        d = tmp_path_factory.mktemp(f"n{n}")
        proc = torchrun(n, "ddp_demo.train", *FLAGS, "--model", "cnn", "--out", str(d), cwd=d)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = (d, proc)
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_whole_run_is_world_size_invariant(runs, n):
    d1, d = runs[1][0], runs[n][0]
    assert max_diff(load(d / "final.pt"), load(d1 / "final.pt")) <= 1e-10
    losses = [[json.loads(line)["loss"] for line in open(x / "metrics.jsonl")] for x in (d1, d)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-10)


def test_outputs_have_the_promised_shape(runs):
    d, proc = runs[2]
    state = load(d / "final.pt")
    assert state and not any(k.startswith("module.") for k in state)
    metrics = [json.loads(line) for line in open(d / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert all(set(m) == {"step", "loss", "samples_per_s"} for m in metrics)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["model"] == "cnn" and summary["launcher"] == "torchrun"
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0 and summary["params_identical_across_ranks"]
    assert summary["final_loss"] == metrics[-1]["loss"]


def test_non_zero_ranks_stay_quiet(runs):
    _, proc = runs[4]
    assert proc.stdout.count("bit-identical parameters") == 1
    assert "[rank" not in proc.stdout


def test_plain_python_equals_torchrun(runs, tmp_path):
    proc = train(*FLAGS, "--model", "cnn", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert max_diff(load(tmp_path / "final.pt"), load(runs[1][0] / "final.pt")) <= 1e-10
    assert json.loads((tmp_path / "summary.json").read_text())["launcher"] == "python"


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The same job at N = 2 with --skip-grad-sync: it writes its outputs, then fails its check."""
    d = tmp_path_factory.mktemp("nosync")
    return d, torchrun(2, "ddp_demo.train", *FLAGS, "--model", "cnn", "--skip-grad-sync", "--out", str(d), cwd=d)


def test_negative_control_skipping_gradient_sync_is_caught(runs, control):
    d, proc = control
    assert proc.returncode != 0
    assert proc.stderr.count("ranks hold different parameters") == 1
    assert max_diff(load(d / "final.pt"), load(runs[1][0] / "final.pt")) > 1e-3
    assert json.loads((d / "summary.json").read_text())["params_identical_across_ranks"] is False


def test_compare_prints_the_runs_agree_and_the_control_does_not(runs, control, tmp_path, capsys):
    """ddp_demo.compare on the real runs (issue 15): N = 2 and 4 within 1e-10 of N = 1, the
    control at least 100 times that tolerance away."""
    dirs = [str(runs[n][0]) for n in (1, 2, 4)] + [str(control[0])]
    assert compare.main([*dirs, "--out", str(tmp_path / "proof.png")]) == 0
    printed = compare_report(capsys.readouterr().out)
    assert printed["N = 2, torchrun"]["largest"] <= 1e-10 and printed["N = 4, torchrun"]["largest"] <= 1e-10
    assert printed["N = 2, torchrun, --skip-grad-sync"]["largest"] >= 100 * 1e-10


def test_default_run_learns(tmp_path):
    """The README's main job: no flags, 2 CPU processes, >= 90% held-out accuracy."""
    proc = torchrun(2, "ddp_demo.train", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["heldout_accuracy"] >= 0.90
