"""python -m ddp_demo.compare (issue 15): the picture has the promised panels, the printed
differences are the files' own, and runs of different jobs are refused with one line.

The run directories here are written by hand in the trainer's format (fast); the real
trainer's runs are compared in tests/test_train.py."""

from __future__ import annotations

import json
import sys

import pytest

from ddp_demo import compare

from .helpers import PYTHON, ROOT, compare_report, run_cmd

JOB = {"seed": 0, "model": "mlp", "global_batch_size": 64, "dtype": "float64", "data": None, "optimizer": "sgd",
       "lr": 0.05, "grad_accum_steps": 1, "skip_grad_sync": False}
REFERENCE = [0.7, 0.5, 0.4, 0.3, 0.25]


def write_run(path, losses, world_size=1, launcher="python", **settings):
    """A run directory as ddp_demo.train writes it (the parts compare reads)."""
    path.mkdir(parents=True)
    summary = {"config": {**JOB, **settings}, "world_size": world_size, "launcher": launcher}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": loss, "samples_per_s": 1.0}) + "\n"
                                                for i, loss in enumerate(losses)))
    return str(path)


@pytest.fixture
def three_runs(tmp_path):
    """One process; N = 2, equal but for rounding at two steps; the no-sync control, far off."""
    return [write_run(tmp_path / "n1", REFERENCE),
            write_run(tmp_path / "n2", [0.7, 0.5 + 1.1e-16, 0.4, 0.3 + 2.2e-16, 0.25], 2, "torchrun"),
            write_run(tmp_path / "nosync", [0.7, 0.52, 0.43, 0.36, 0.31], 2, "torchrun", skip_grad_sync=True)]


def losses_of(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(f"{run_dir}/metrics.jsonl")]


def test_figure_has_both_panels_with_labels_log_scale_and_zeros_on_the_floor(three_runs):
    from ddp_demo.plots import figures

    runs = [compare.load_run(d) for d in three_runs]
    labels = compare.labels_of(runs)
    assert labels == ["N = 1, python", "N = 2, torchrun", "N = 2, torchrun, --skip-grad-sync"]
    diffs = [compare.Difference.between(runs[0], run) for run in runs]
    fig = figures.compare_figure(runs, labels, diffs, compare.tolerance_of(runs[0]))
    try:
        top, bottom = fig.axes
        assert [line.get_label() for line in top.get_lines()] == labels
        assert list(top.get_lines()[0].get_ydata()) == REFERENCE
        assert bottom.get_yscale() == "log"
        *curves, floor_line, tolerance_line = bottom.get_lines()
        assert tolerance_line.get_ydata()[0] == 1e-10 and "tolerance 1e-10 (float64" in tolerance_line.get_label()
        assert [c.get_label() for c in curves] == labels[1:]  # the reference is not compared with itself
        floor = figures.zero_floor([1.1e-16])
        assert floor == pytest.approx(1e-17) and floor_line.get_ydata()[0] == floor
        assert "exactly 0" in floor_line.get_label()
        n2 = curves[0].get_ydata()
        assert [n2[i] == floor for i in range(5)] == [True, False, True, False, True]  # zeros drawn, not dropped
        assert curves[1].get_ydata()[-1] == pytest.approx(0.06)
    finally:
        figures.plt.close(fig)


def test_command_writes_a_png_and_prints_the_files_differences(three_runs, tmp_path, capsys):
    out = tmp_path / "pictures" / "proof.png"
    assert compare.main([*three_runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = compare_report(capsys.readouterr().out)
    reference = losses_of(three_runs[0])
    for run_dir, label in zip(three_runs[1:], ["N = 2, torchrun", "N = 2, torchrun, --skip-grad-sync"], strict=True):
        diffs = [abs(a - b) for a, b in zip(losses_of(run_dir), reference, strict=True)]
        largest = max(diffs)
        assert printed[label]["largest"] == pytest.approx(largest, rel=5e-3)  # printed with 3 digits
        assert printed[label]["step"] == diffs.index(largest) + 1
        assert printed[label]["exact"] == diffs.count(0.0)
    assert printed["N = 2, torchrun"]["largest"] <= 1e-15
    assert printed["N = 2, torchrun, --skip-grad-sync"]["largest"] >= 0.05


def verdict_of(capsys, runs, out) -> tuple[int, list[str]]:
    code = compare.main([*runs, "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    return code, [line for line in lines if line.startswith(("tolerance", "PASS", "FAIL", "NO VERDICT"))]


def test_the_verdict_names_the_tolerance_and_the_control(three_runs, tmp_path, capsys):
    """Issue 26: compare printed differences and no verdict; now PASS/FAIL by core/tolerances.py."""
    code, (rule, verdict) = verdict_of(capsys, three_runs, tmp_path / "p.png")
    assert code == 0 and rule.startswith("tolerance (float64, a whole run") and "<= 1e-10" in rule
    assert verdict.startswith("PASS: N = 2, torchrun within 1e-10 of N = 1, python at every step")
    assert "control N = 2, torchrun, --skip-grad-sync misses by" in verdict and "as expected" in verdict


@pytest.mark.parametrize("case", ["a run off by 1e-9", "a control that matches"])
def test_negative_control_the_verdict_fails(tmp_path, capsys, case):
    off = [0.7, 0.5 + 1e-9, 0.4, 0.3, 0.25]
    runs = [write_run(tmp_path / "n1", REFERENCE), write_run(tmp_path / "n2", off, 2, "torchrun")
            if case == "a run off by 1e-9" else
            write_run(tmp_path / "nosync", REFERENCE, 2, "torchrun", skip_grad_sync=True)]
    code, (_, verdict) = verdict_of(capsys, runs, tmp_path / "p.png")
    assert code == 1 and verdict.startswith("FAIL: ") and "tolerance 1e-10" in verdict, verdict


def test_float32_gets_no_verdict_and_says_why(tmp_path, capsys):
    runs = [write_run(tmp_path / n, REFERENCE, dtype="float32") for n in ("a", "b")]
    code, lines = verdict_of(capsys, runs, tmp_path / "p.png")
    assert code == 0 and lines[-1].startswith("NO VERDICT: ") and "--dtype float64" in lines[-1]


def refuse(argv, capsys) -> str:
    code = compare.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ddp_demo: error: "), err
    return err[0]


@pytest.mark.parametrize("setting, value", [("seed", 1), ("model", "cnn"), ("global_batch_size", 32),
                                            ("dtype", "float32"), ("data", "mine.pt"), ("lr", 0.1)])
def test_refuses_runs_of_different_jobs(tmp_path, capsys, setting, value):
    runs = [write_run(tmp_path / "a", REFERENCE), write_run(tmp_path / "b", REFERENCE, 2, **{setting: value})]
    line = refuse([*runs, "--out", str(tmp_path / "p.png")], capsys)
    assert f"--{setting.replace('_', '-')} {value}" in line and "different jobs" in line
    assert not (tmp_path / "p.png").exists()


def garble(tmp_path, name: str, text: str) -> str:
    run = write_run(tmp_path / "bad", REFERENCE)
    (tmp_path / "bad" / name).write_text(text)
    return run


@pytest.mark.parametrize("case, expected", [
    ("missing dir", "is not a directory"),
    ("no summary", "has no summary.json"),
    ("garbled summary", "summary.json is not what ddp_demo.train writes"),
    ("summary without the seed", "KeyError: 'seed'"),
    ("garbled metrics", "metrics.jsonl is not what ddp_demo.train writes"),
    ("no steps", "metrics.jsonl is not what ddp_demo.train writes (ValueError: no steps)"),
])
def test_refuses_a_missing_or_garbled_run(tmp_path, capsys, case, expected):
    bad = {
        "missing dir": lambda: str(tmp_path / "nowhere"),
        "no summary": lambda: str((tmp_path / "empty").mkdir() or tmp_path / "empty"),
        "garbled summary": lambda: garble(tmp_path, "summary.json", '{"config": '),
        "summary without the seed": lambda: garble(tmp_path, "summary.json", '{"config": {}, "world_size": 2}'),
        "garbled metrics": lambda: garble(tmp_path, "metrics.jsonl", '{"step": 1}\n'),
        "no steps": lambda: garble(tmp_path, "metrics.jsonl", "\n"),
    }[case]()
    good = write_run(tmp_path / "good", REFERENCE)
    line = refuse([good, bad, "--out", str(tmp_path / "p.png")], capsys)
    assert expected in line, line
    assert not (tmp_path / "p.png").exists()


def test_refuses_one_run_and_an_unknown_picture_format(tmp_path, capsys):
    run = write_run(tmp_path / "a", REFERENCE)
    assert "at least two run directories" in refuse([run, "--out", str(tmp_path / "p.png")], capsys)
    assert "--out p.txt: use a .png" in refuse([run, run, "--out", "p.txt"], capsys)


def test_without_matplotlib_says_which_extra_to_install(three_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.delitem(sys.modules, "ddp_demo.plots.figures", raising=False)
    monkeypatch.delattr("ddp_demo.plots.figures", raising=False)
    line = refuse([*three_runs, "--out", str(tmp_path / "p.png")], capsys)
    assert 'pip install -e ".[plot]"' in line


def test_commands_that_do_not_draw_never_import_matplotlib():
    code = "import sys, ddp_demo.compare, ddp_demo.train, ddp_demo.verify; print('matplotlib' in sys.modules)"
    proc = run_cmd([PYTHON, "-c", code], ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr

