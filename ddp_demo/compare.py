"""Several runs of one job on one picture: do N processes train what one process trains?

    python -m ddp_demo.compare runs/n1 runs/n2 runs/n4 runs/nosync --out proof.png

Each RUN_DIR is the ``--out`` directory of a ``ddp_demo.train`` (or ``train_accelerate``) run:
``metrics.jsonl`` holds the loss of every step's global batch, ``summary.json`` the settings,
the world size and the launcher. The first run is the reference. The picture has two panels:
every run's loss per step, and each other run's |loss − reference loss| on a log scale, where
exact zeros (which no log scale can show) sit on a marked floor, and a line marks the tolerance.
The largest difference of each run is printed, then the verdict: PASS when every run stays within
the whole-run tolerance of its dtype (core/tolerances.py) at every step and every control
(``--skip-grad-sync``) misses it by ``CONTROL_MARGIN`` times; exit 1 on FAIL. Runs of different
jobs (seed, model, global batch, dtype, data, optimizer or learning rate) are refused: their
losses differ for reasons that have nothing to do with DDP.

matplotlib draws the picture (the ``plot`` extra); it is imported only to draw.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ddp_demo.core import log
from ddp_demo.core.config import ConfigError
from ddp_demo.core.flags import add_options, option, parse_into
from ddp_demo.core.tolerances import CONTROL_MARGIN, WHOLE_RUN_BY_DTYPE
from ddp_demo.plots import FORMATS, check_out_file, load_figures

# The settings that define the job: runs differing in any of these are different experiments.
# World size, launcher, --grad-accum-steps and --skip-grad-sync may differ: they are what is compared.
SAME_JOB = ("seed", "model", "global_batch_size", "dtype", "data", "optimizer", "lr")
STARTED_BY = "pass the --out directory of a finished ddp_demo.train run"


@dataclass(frozen=True)
class Run:
    """One run directory, read and checked."""

    path: Path
    summary: dict
    losses: dict[int, float]  # step -> the loss of that step's global batch

    @property
    def config(self) -> dict:
        return self.summary["config"]

    def label(self) -> str:
        """``N = 2, torchrun, --skip-grad-sync``: what was varied, in the run's own words."""
        parts = [f"N = {self.summary['world_size']}", self.summary.get("launcher", "launcher not recorded")]
        if self.config.get("grad_accum_steps", 1) > 1:
            parts.append(f"--grad-accum-steps {self.config['grad_accum_steps']}")
        if self.config.get("skip_grad_sync"):
            parts.append("--skip-grad-sync")
        return ", ".join(parts)


def parse_summary(text: str) -> dict:
    summary = json.loads(text)
    int(summary["world_size"])
    for key in SAME_JOB:
        summary["config"][key]  # noqa: B018 (a KeyError names the missing setting)
    return summary


def parse_metrics(text: str) -> dict[int, float]:
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    losses = {int(m["step"]): float(m["loss"]) for m in entries}
    if not losses:
        raise ValueError("no steps")
    return losses


def read_part(run_dir: Path, name: str, parse):
    """One of the run's files, parsed; a missing or garbled file is a ConfigError naming it."""
    path = run_dir / name
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {name}; {STARTED_BY}")
    try:
        return parse(path.read_text())
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not what ddp_demo.train writes ({type(e).__name__}: {e}); "
                          "rerun that job") from None


def load_run(path: str) -> Run:
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"{path} is not a directory; {STARTED_BY}")
    return Run(d, read_part(d, "summary.json", parse_summary), read_part(d, "metrics.jsonl", parse_metrics))


def check_same_job(runs: list[Run]) -> None:
    if len(runs) < 2:
        raise ConfigError("give at least two run directories: the first is the reference the others are compared to")
    ref = runs[0]
    for run in runs[1:]:
        for key in SAME_JOB:
            if run.config[key] != ref.config[key]:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(f"{run.path} ran {flag} {run.config[key]} but {ref.path} ran {flag} "
                                  f"{ref.config[key]}: different jobs, whose losses differ for reasons other "
                                  "than DDP; compare runs of one job")
        if not run.losses.keys() & ref.losses.keys():
            raise ConfigError(f"{run.path} and {ref.path} share no step; compare runs of one job")


@dataclass(frozen=True)
class Difference:
    """|loss − reference loss| at each step both runs logged."""

    steps: list[int]
    values: list[float]

    @classmethod
    def between(cls, ref: Run, run: Run) -> Difference:
        steps = sorted(ref.losses.keys() & run.losses.keys())
        return cls(steps, [abs(run.losses[s] - ref.losses[s]) for s in steps])

    def largest(self) -> tuple[float, int]:
        """The largest difference and (the first) step where it happens."""
        value = max(self.values)
        return value, self.steps[self.values.index(value)]

    def report(self, label: str) -> str:
        value, step = self.largest()
        exact = sum(v == 0 for v in self.values)
        return (f"{label}: largest |loss - reference| {value:.3g} at step {step}; "
                f"{exact} of {len(self.values)} steps exactly equal")


def labels_of(runs: list[Run]) -> list[str]:
    """Each run's label; where two runs would read the same, their directory names tell them apart."""
    labels = [run.label() for run in runs]
    return [f"{label} ({run.path.name})" if labels.count(label) > 1 else label
            for label, run in zip(labels, runs, strict=True)]


def tolerance_of(ref: Run) -> float | None:
    """The whole-run tolerance for this job's dtype (core/tolerances.py); None where none is stated:
    float32 (its rounding compounds over a run, see ``NO_VERDICT``) and autocast runs (--precision)."""
    if ref.config.get("precision", "fp32") != "fp32":
        return None
    tol = WHOLE_RUN_BY_DTYPE.get(ref.config["dtype"])
    return None if tol is None else tol.atol


# Measured (issue 26; 300 steps of the default job, float32): N = 4 drifts from N = 1 by 1.2e-7 (mlp),
# 7.8e-8 (multiply) and 2.6e-3 (cnn), the unsynced controls by 0.08, 5.2e-3 and 0.5: no one number
# separates them all by CONTROL_MARGIN, so float32 gets no whole-run tolerance and no verdict here.
NO_VERDICT = ("NO VERDICT: core/tolerances.py states a whole-run tolerance for float64 only ({float64:g}); in "
              "{dtype}{precision} rounding compounds over the steps (the CNN's N = 4 drifts 2.6e-3 from N = 1 in "
              "300 steps, its unsynced control 0.5), so no fixed number can judge it; rerun the jobs with "
              "--dtype float64 for a PASS/FAIL")


def verdict(runs: list[Run], labels: list[str], diffs: list[Difference], tol: float | None) -> tuple[bool, list[str]]:
    """PASS when every run stays within ``tol`` of the reference at every step and every control
    (``--skip-grad-sync``) misses it by at least ``CONTROL_MARGIN`` tolerances."""
    dtype = runs[0].config["dtype"]
    if tol is None:
        precision = runs[0].config.get("precision", "fp32")
        return True, [NO_VERDICT.format(float64=WHOLE_RUN_BY_DTYPE["float64"].atol, dtype=dtype,
                                        precision="" if precision == "fp32" else f" with --precision {precision}")]
    same, controls, failed = [], [], []
    for run, label, diff in zip(runs[1:], labels[1:], diffs[1:], strict=True):
        largest = diff.largest()[0]
        if run.config.get("skip_grad_sync"):
            controls.append(f"{label} misses by {largest / tol:.3g} tolerances")
            if largest < CONTROL_MARGIN * tol:
                failed.append(f"the control {label} is within {CONTROL_MARGIN} tolerances ({largest:.3g})")
        else:
            same.append(label)
            if largest > tol:
                failed.append(f"{label} differs by {largest:.3g}")
    rule = (f"tolerance ({dtype}, a whole run; core/tolerances.py): |loss - reference| <= {tol:g} at every step; "
            f"a control (--skip-grad-sync) must miss by {CONTROL_MARGIN} x that")
    if failed:
        return False, [rule, f"FAIL: {'; '.join(failed)} (tolerance {tol:g})"]
    said = [f"{' and '.join(same)} within {tol:g} of {labels[0]} at every step"] if same else []
    said += [f"control {c}, as expected" for c in controls]
    return True, [rule, "PASS: " + "; ".join(said)]


@dataclass(frozen=True)
class CompareOptions:
    runs: tuple[str, ...] = option((), "--out directories of runs of one job; the first is the reference",
                                   type_=str, positional=True, nargs="+", metavar="RUN_DIR")
    out: str | None = option(None, f"the picture to write ({', '.join(FORMATS)})", type_=str, required=True)


def parse_args(argv: list[str] | None) -> CompareOptions:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.compare", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m ddp_demo.compare runs/n1 runs/n2 --out proof.png; "
                                     "exit status 0 PASS, 1 FAIL, 2 bad input")
    return parse_into(CompareOptions, add_options(parser, CompareOptions), argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out_file(args.out)
        runs = [load_run(path) for path in args.runs]
        check_same_job(runs)
        plots = load_figures()
    except ConfigError as e:
        log.error(0, str(e))
        return 2
    labels = labels_of(runs)
    diffs = [Difference.between(runs[0], run) for run in runs]
    tol = tolerance_of(runs[0])
    plots.save(plots.compare_figure(runs, labels, diffs, tol), args.out)
    print(f"reference: {labels[0]} ({runs[0].path}), {len(runs[0].losses)} steps")
    for label, diff in zip(labels[1:], diffs[1:], strict=True):
        print(diff.report(label))
    ok, lines = verdict(runs, labels, diffs, tol)
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
