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


def mark_floor(ax, floor: float) -> None:
    """A dotted line at the floor, named in the legend (call before ``ax.legend``)."""
    ax.axhline(floor, color="0.4", linestyle=":", linewidth=1,
               label=f"exactly 0, drawn at {floor:.0e} (a log scale has no 0)")


def compare_figure(runs, labels: list[str], diffs):
    """Top: every run's loss per step. Bottom: |loss − the first run's loss|, log scale."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        steps = sorted(run.losses)
        top.plot(steps, [run.losses[s] for s in steps], label=label, **style(i))
    top.set_yscale("log")
    top.set_ylabel("loss of the global batch")
    top.set_title("Loss per step", fontsize=10)
    top.legend(fontsize=8)
    difference_panel(bottom, labels, diffs)
    cfg = runs[0].config
    fig.suptitle(f"One job, several launches: {cfg['model']}, {cfg['dtype']}, global batch {cfg['global_batch_size']}, "
                 f"{cfg['optimizer']} lr {cfg['lr']:g}, seed {cfg['seed']}")
    fig.tight_layout()
    return fig


def difference_panel(ax, labels: list[str], diffs) -> None:
    """Each run but the reference (whose difference to itself is 0 by definition)."""
    floor = zero_floor(v for diff in diffs[1:] for v in diff.values)
    for i, (label, diff) in enumerate(zip(labels, diffs, strict=True)):
        if i > 0:
            ax.plot(diff.steps, on_floor(diff.values, floor), label=label, marker=".", markersize=4,
                    **{**style(i), "linewidth": 1})
    ax.set_yscale("log")
    mark_floor(ax, floor)
    ax.set_xlabel("step")
    ax.set_ylabel(f"|loss − loss of {labels[0]}|")
    ax.set_title("Difference from the first run (log scale)", fontsize=10)
    ax.legend(fontsize=8)


def save(fig, out: str | Path) -> None:
    """Written whole or not at all (core/outputs.atomic_write); the format follows the suffix."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:], dpi=110))
    plt.close(fig)
