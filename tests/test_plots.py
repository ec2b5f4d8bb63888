"""The check's picture (issue 15, ddp_demo/plots/figures.py ``check_figure``): from the check's JSON
report, each tensor's largest difference at every world size against its tolerance, with a
failing tensor visible at a glance. Inspects the matplotlib figure, not pixels."""

from __future__ import annotations

import pytest

from ddp_demo.plots import figures


def tensor(name, stage, diff, tolerance=1e-12, kind="parameter"):
    return {"name": name, "kind": kind, "stage": stage, "max_abs_diff": diff, "tolerance": tolerance,
            "ok": diff is not None and diff <= tolerance}


def world(n, grads, after, error=None):
    return {"world_size": n, "seconds": 1.0, "ok": error is None, "error": error, "unused_parameters": [],
            "tensors": [tensor(name, "gradient", d) for name, d in grads.items()]
            + [tensor(name, "after_steps", d) for name, d in after.items()]}


REPORT = {
    "target": "model.py:build", "verdict": "FAIL", "exit_code": 1,
    "plan": {"dtype": "float64", "optimizer": "sgd", "lr": 0.05, "steps": 3, "find_unused_parameters": False},
    "world_sizes": [
        world(2, {"conv.weight": 2e-17, "bn.weight": 3e-3, "head.weight": 0.0, "extra.weight": None},
              {"conv.weight": 1e-16, "bn.weight": 4e-3, "head.weight": 0.0, "extra.weight": 0.0}),
        world(3, {"conv.weight": 0.0, "bn.weight": 5e-3, "head.weight": 1e-17, "extra.weight": None},
              {"conv.weight": 2e-16, "bn.weight": 6e-3, "head.weight": 5e-17, "extra.weight": 0.0}),
        {"world_size": 4, "seconds": None, "ok": False, "error": "rank 1: timed out", "unused_parameters": [],
         "tensors": []},
    ],
    "causes": [{"key": "batchnorm", "title": "BatchNorm layers in training mode: bn", "names": ["bn"],
                "why": "", "fix": ""}],
}


def points(ax, label: str) -> list[tuple[float, float]]:
    (collection,) = [c for c in ax.collections if c.get_label() == label]
    return [tuple(xy) for xy in collection.get_offsets()]


def test_each_tensor_against_its_tolerance_with_the_failures_in_red():
    fig = figures.check_figure(REPORT)
    try:
        grads, after = fig.axes
        assert "gradients" in grads.get_title() and "after 3" in after.get_title()
        names = [label.get_text() for label in grads.get_yticklabels()]
        assert names == ["conv.weight", "bn.weight", "head.weight", "extra.weight"]
        red = [label.get_text() for label in grads.get_yticklabels() if label.get_color() == "tab:red"]
        assert red == ["bn.weight", "extra.weight"]  # 3e-3 over 1e-12, and a gradient on one side only
        assert grads.get_xscale() == "log" and after.get_xscale() == "log"
        assert len(grads.patches) == 2 and len(after.patches) == 1  # the shaded rows: failing tensors
        floor, ceiling = 1e-18, 1e-1  # a decade under 2e-17 and over 6e-3
        n2 = points(grads, "N = 2")
        assert [x for x, _ in n2] == pytest.approx([2e-17, 3e-3, floor, ceiling])
        assert [x for x, _ in points(grads, "tolerance")] == [1e-12] * 4
        assert [x for x, _ in points(after, "N = 3")] == pytest.approx([2e-16, 6e-3, 5e-17, floor])
        assert {c.get_label() for c in grads.collections} == {"tolerance", "N = 2", "N = 3"}  # N = 4 drew nothing
        lines = [line.get_label() for line in grads.get_lines()]
        assert any("exactly 0" in label for label in lines) and any("one side only" in label for label in lines)
        title = fig._suptitle.get_text()
        assert "FAIL" in title and "N = 4 did not run to the end" in title and "BatchNorm" in title
    finally:
        figures.plt.close(fig)


def test_a_pass_draws_no_red():
    passed = {**REPORT, "verdict": "PASS", "causes": [],
              "world_sizes": [world(2, {"a.weight": 1e-17, "a.bias": 0.0}, {"a.weight": 2e-17, "a.bias": 0.0})]}
    fig = figures.check_figure(passed)
    try:
        for ax in fig.axes:
            assert not ax.patches and all(label.get_color() != "tab:red" for label in ax.get_yticklabels())
            assert not any("one side only" in line.get_label() for line in ax.get_lines())
        assert fig._suptitle.get_color() == "tab:green"
    finally:
        figures.plt.close(fig)
