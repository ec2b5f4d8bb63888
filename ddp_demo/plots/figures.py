"""The proof as pictures: loss curves that lie on top of each other, differences on a log scale.

matplotlib is the ``plot`` extra (``pip install -e ".[plot]"``); only the commands that draw
import this module. The Agg backend draws straight to a file, with no display needed.

A log scale has no place for 0, yet "exactly equal" is the strongest outcome a difference can
have, so zeros are not dropped: :func:`zero_floor` picks a floor a decade below the smallest
nonzero value, :func:`on_floor` puts the zeros on it and :func:`mark_floor` draws it as a dotted
line that says what it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from ddp_demo.core.outputs import atomic_write  # noqa: E402

# Curves that coincide must all stay visible: the first is drawn widest, each next one
# thinner and dashed, so a thin line running inside a wide one reads as "on top of it".
STYLES = (("-", 6.0), ("--", 3.5), (":", 2.5), ("-.", 1.5))
FLOOR_WHEN_ALL_ZERO = 1e-18  # below float64's rounding of any loss of order 1 (eps 2.2e-16)


def style(i: int) -> dict:
    line, width = STYLES[i % len(STYLES)]
    return {"color": f"C{i}", "linestyle": line, "linewidth": width}


def zero_floor(values) -> float:
    """A power of ten a decade below the smallest nonzero value."""
    smallest = min((v for v in values if v > 0), default=None)
    if smallest is None:
        return FLOOR_WHEN_ALL_ZERO
    return 10.0 ** (math.floor(math.log10(smallest)) - 1)


def on_floor(values, floor: float) -> list[float]:
    return [v if v > 0 else floor for v in values]


def mark_floor(ax, floor: float, vertical: bool = False) -> None:
    """A dotted line at the floor, named in the legend (call before ``ax.legend``)."""
    (ax.axvline if vertical else ax.axhline)(floor, color="0.4", linestyle=":", linewidth=1,
                                             label=f"exactly 0, drawn at {floor:.0e} (a log scale has no 0)")


def compare_figure(runs, labels: list[str], diffs, tolerance: float | None = None):
    """Top: every run's loss per step. Bottom: |loss − the first run's loss|, log scale, with the
    whole-run ``tolerance`` the verdict judges by drawn across it (python -m ddp_demo.compare)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        steps = sorted(run.losses)
        top.plot(steps, [run.losses[s] for s in steps], label=label, **style(i))
    top.set_yscale("log")
    top.set_ylabel("loss of the global batch")
    top.set_title("Loss per step", fontsize=10)
    top.legend(fontsize=8)
    cfg = runs[0].config
    difference_panel(bottom, labels, diffs, tolerance, cfg["dtype"])
    fig.suptitle(f"One job, several launches: {cfg['model']}, {cfg['dtype']}, global batch {cfg['global_batch_size']}, "
                 f"{cfg['optimizer']} lr {cfg['lr']:g}, seed {cfg['seed']}")
    fig.tight_layout()
    return fig


def difference_panel(ax, labels: list[str], diffs, tolerance: float | None = None, dtype: str = "") -> None:
    """Each run but the reference (whose difference to itself is 0 by definition); the tolerance line:
    a run below it matches, a control (--skip-grad-sync) must rise far above it."""
    floor = zero_floor(v for diff in diffs[1:] for v in diff.values)
    for i, (label, diff) in enumerate(zip(labels, diffs, strict=True)):
        if i > 0:
            ax.plot(diff.steps, on_floor(diff.values, floor), label=label, marker=".", markersize=4,
                    **{**style(i), "linewidth": 1})
    ax.set_yscale("log")
    if any(v == 0 for diff in diffs[1:] for v in diff.values):
        mark_floor(ax, floor)
    if tolerance is not None:
        ax.axhline(tolerance, color="black", linestyle="--", linewidth=1.2,
                   label=f"tolerance {tolerance:g} ({dtype}, a whole run): a match stays below it")
    ax.set_xlabel("step")
    ax.set_ylabel(f"|loss − loss of {labels[0]}|")
    ax.set_title("Difference from the first run (log scale)", fontsize=10)
    ax.legend(fontsize=8)


# --- python -m ddp_demo.check --plot: each tensor against its tolerance, at every world size ------

MARKERS = "osD^vP*X"


def check_figure(report: dict):
    """From the check's JSON report (format: docs/check.md): one panel per comparison, a row per
    tensor, a marker per world size at its largest difference and a black bar at its tolerance.
    A tensor that differs anywhere is shaded and named in red, so a FAIL shows where at a glance."""
    worlds = [w for w in report["world_sizes"] if w["tensors"]]
    stages = {"gradient": "gradients after the first backward",
              "after_steps": f"tensors after {report['plan']['steps']} optimizer step(s)"}
    cells = [t for w in worlds for t in w["tensors"]]
    values = [v for t in cells for v in (t["max_abs_diff"], t["tolerance"]) if v is not None]
    one_sided = any(t["max_abs_diff"] is None for t in cells)
    scale = Scale(zero_floor(values), 10.0 ** (math.ceil(math.log10(max(values))) + 1) if one_sided else None)
    rows = max([sum(t["stage"] == stage for t in worlds[0]["tensors"]) for stage in stages] if worlds else [1])
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4.0, 0.32 * rows + 2.5)))
    for ax, (stage, title) in zip(axes, stages.items(), strict=True):
        if worlds:
            tensor_panel(ax, worlds, stage, scale)
        ax.set_title(title, fontsize=10)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize=8)
    fig.suptitle(check_title(report), color="tab:green" if report["verdict"] == "PASS" else "tab:red")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def check_title(report: dict) -> str:
    lines = [f"ddp_demo.check {report['target']}: {report['verdict']}"]
    lines += [f"N = {w['world_size']} did not run to the end" for w in report["world_sizes"] if w["error"]]
    lines += [f"cause: {c['title']}" for c in report["causes"]]
    return "\n".join(lines)


@dataclass(frozen=True)
class Scale:
    """Where a log axis draws what it cannot: 0 on the floor, "on one side only" (JSON null) on the ceiling."""

    floor: float
    ceiling: float | None  # None: no tensor is on one side only

    def place(self, value: float | None) -> float:
        return self.ceiling if value is None else value if value > 0 else self.floor


def tensor_panel(ax, worlds: list[dict], stage: str, scale: Scale) -> None:
    by_n = {w["world_size"]: {t["name"]: t for t in w["tensors"] if t["stage"] == stage} for w in worlds}
    names = list(by_n[worlds[0]["world_size"]])  # the model's order
    cells = [t for tensors in by_n.values() for t in tensors.values()]
    failing = {t["name"] for t in cells if not t["ok"]}
    for i, name in enumerate(names):
        if name in failing:
            ax.axhspan(i - 0.5, i + 0.5, color="tab:red", alpha=0.12, linewidth=0)
    tolerances = [by_n[worlds[0]["world_size"]][name]["tolerance"] for name in names]
    ax.scatter(tolerances, range(len(names)), marker="|", s=250, color="k", label="tolerance", zorder=2)
    for j, (n, tensors) in enumerate(by_n.items()):
        ys = [i + (j - (len(by_n) - 1) / 2) * 0.18 for i in range(len(names))]  # side by side, not hidden
        ax.scatter([scale.place(tensors[name]["max_abs_diff"]) for name in names], ys,
                   marker=MARKERS[j % len(MARKERS)], color=f"C{j}", label=f"N = {n}", zorder=3)
    ax.set_xscale("log")
    if any(t["max_abs_diff"] == 0 for t in cells):
        mark_floor(ax, scale.floor, vertical=True)
    if scale.ceiling is not None:
        ax.axvline(scale.ceiling, color="tab:red", linestyle=":", linewidth=1,
                   label=f"on one side only (e.g. no gradient), drawn at {scale.ceiling:.0e}")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for label in ax.get_yticklabels():
        if label.get_text() in failing:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first tensor on top
    ax.set_xlabel("max |DDP − one process| over ranks and elements")


def save(fig, out: str | Path) -> None:
    """Written whole or not at all (core/outputs.atomic_write); the format follows the suffix."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:], dpi=110))
    plt.close(fig)
