"""Check your own model: DDP on N processes equals one process, or the reason it does not.

    python -m ddp_demo.check path/to/file.py:build --world-sizes 2 3

The route runs one way, in the order the data flows: ``target`` loads and validates the
function you name (it returns ``(model, batch, loss_fn)``); ``engine`` trains it under real
DDP on N gloo processes and in one process; ``verdict`` compares every tensor; ``diagnose``
names the cause of a difference; ``report`` prints it or writes it as JSON. This module walks
that route. ``ddp_demo.testing.assert_ddp_equivalent`` runs the same check in pytest.
Design, tolerances and the JSON format: docs/check.md.
"""

from __future__ import annotations

import math

from ddp_demo.check.diagnose import diagnose
from ddp_demo.check.engine import Plan, reference, run_world
from ddp_demo.check.options import CheckOptions
from ddp_demo.check.reduce_dtype import attach, check_lower, with_baselines
from ddp_demo.check.target import call_target, check_batch_divides, check_repeatable
from ddp_demo.check.verdict import Verdict, World, judge, tolerance_for
from ddp_demo.core.spawn import WorkerError


def prepare(plan: Plan, world_sizes: tuple[int, ...]) -> Verdict:
    """Everything that can go wrong before a process starts (CheckError), then the reference."""
    target = call_target(plan.spec, plan.dtype)  # never trained: it describes and diagnoses the model
    check_lower(plan, target)
    check_batch_divides(plan.spec, target, world_sizes)
    check_repeatable(plan.spec, target, plan.dtype)
    return Verdict(plan, target, reference(plan), tolerance_for(plan, target))


def run_worlds(verdicts: list[Verdict], world_sizes: tuple[int, ...], timeout: float) -> None:
    """For each N, one set of processes runs every target (and the baselines of --reduce-dtype,
    reduce_dtype.py); each verdict judges its share."""
    plans = with_baselines([v.plan for v in verdicts])
    for n in world_sizes:
        try:
            results, seconds = run_world(n, plans, timeout)
        except WorkerError as e:
            for v in verdicts:
                v.worlds.append(World(n, math.nan, error=str(e)))
            continue
        mine, baselines = results[:len(verdicts)], results[len(verdicts):]
        for v, ranks in zip(verdicts, mine, strict=True):
            v.worlds.append(judge(v, n, seconds, ranks))
        attach(verdicts, n, baselines, mine)


def check_plans(plans: list[Plan], world_sizes: tuple[int, ...], timeout: float = 120.0) -> list[Verdict]:
    """Check every plan (a target and how to train it) at every world size; one set of processes
    per N runs them all. Raises ``CheckError`` (before any process starts) for bad input."""
    verdicts = [prepare(plan, world_sizes) for plan in plans]
    run_worlds(verdicts, world_sizes, timeout)
    for v in verdicts:
        v.causes = diagnose(v)
    return verdicts


def check(specs: list[str], options: CheckOptions) -> list[Verdict]:
    """The command's check: every target trained the same way (``options``)."""
    return check_plans([plan for spec in specs for plan in options.plans(spec)], options.world_sizes,
                       options.timeout)
