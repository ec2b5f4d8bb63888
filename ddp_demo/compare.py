"""Several runs of one job on one picture: do N processes train what one process trains?

    python -m ddp_demo.compare runs/n1 runs/n2 runs/n4 runs/nosync --out proof.png

Each RUN_DIR is the ``--out`` directory of a ``ddp_demo.train`` (or ``train_accelerate``) run:
``metrics.jsonl`` holds the loss of every step's global batch, ``summary.json`` the settings,
the world size and the launcher. The first run is the reference. The picture has two panels:
every run's loss per step, and each other run's |loss − reference loss| on a log scale, where
exact zeros (which no log scale can show) sit on a marked floor. The largest difference of each
run is printed. Runs of different jobs (seed, model, global batch, dtype, data, optimizer or
learning rate) are refused: their losses differ for reasons that have nothing to do with DDP.

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


@dataclass(frozen=True)
class CompareOptions:
    runs: tuple[str, ...] = option((), "--out directories of runs of one job; the first is the reference",
                                   type_=str, positional=True, nargs="+", metavar="RUN_DIR")
    out: str | None = option(None, f"the picture to write ({', '.join(FORMATS)})", type_=str, required=True)


def parse_args(argv: list[str] | None) -> CompareOptions:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.compare", description=__doc__.split("\n\n")[0])
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
    plots.save(plots.compare_figure(runs, labels, diffs), args.out)
    print(f"reference: {labels[0]} ({runs[0].path}), {len(runs[0].losses)} steps")
    for label, diff in zip(labels[1:], diffs[1:], strict=True):
        print(diff.report(label))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
