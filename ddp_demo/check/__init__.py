"""Check your own model: DDP on N processes equals one process, or the reason it does not.

    python -m ddp_demo.check path/to/file.py:build --world-sizes 2 3

The route runs one way, in the order the data flows: ``target`` loads and validates the
function you name (it returns ``(model, batch, loss_fn)`` or a :class:`Recipe`, ``recipe.py``);
``engine`` trains it under real DDP (or zero, fsdp) on N gloo processes, recording what each
step did (``trace.py``; a rank that stops is named by ``stalled.py``), and in one process;
``verdict`` compares every tensor; ``diagnose`` (and ``diagnose_step``) names the cause of a
difference; ``report`` prints it or writes it as JSON. This module walks that route.
``ddp_demo.testing.assert_ddp_equivalent`` runs the same check in pytest.
Design, tolerances and the JSON format: docs/check.md.
"""

from __future__ import annotations

import math

from ddp_demo.check.diagnose import diagnose
from ddp_demo.check.engine import Plan, reference, run_worlds
from ddp_demo.check.options import CheckOptions
from ddp_demo.check.recipe import Recipe
from ddp_demo.check.reduce_dtype import attach, check_lower, with_baselines
from ddp_demo.check.target import call_target, check_batch_divides, check_repeatable
from ddp_demo.check.verdict import Verdict, World, judge, tolerance_for
from ddp_demo.core.spawn import WorkerError

__all__ = ["Recipe", "check", "check_plans"]


def prepare(plan: Plan, world_sizes: tuple[int, ...]) -> Verdict:
    """Everything that can go wrong before a process starts (CheckError), then the reference."""
    target = call_target(plan.spec, plan.dtype)  # never trained: it describes and diagnoses the model
    check_lower(plan, target)
    check_batch_divides(plan.spec, target, world_sizes)
    check_repeatable(plan.spec, target, plan.dtype)
    ref = reference(plan)
    return Verdict(plan, target, ref, tolerance_for(ref, target))


def judge_worlds(verdicts: list[Verdict], world_sizes: tuple[int, ...], timeout: float) -> None:
    """One set of processes runs every target at every N (engine.run_worlds), and the baselines of
    --reduce-dtype (reduce_dtype.py); each verdict judges its share."""
    try:
        worlds = run_worlds(world_sizes, with_baselines([v.plan for v in verdicts]), timeout)
    except WorkerError as e:  # a rank stopped answering: its one line first (stalled.py)
        for v in verdicts:
            v.worlds.append(World(max(world_sizes), math.nan, error=str(e)))
        return
    for n in sorted(world_sizes):
        results, seconds = worlds[n]
        mine, baselines = results[:len(verdicts)], results[len(verdicts):]
        for v, ranks in zip(verdicts, mine, strict=True):
            v.worlds.append(judge(v, n, seconds, ranks))
        attach(verdicts, n, baselines, mine)


def check_plans(plans: list[Plan], world_sizes: tuple[int, ...], timeout: float = 120.0) -> list[Verdict]:
    """Check every plan (a target and how to train it) at every world size; one set of processes
    per N runs them all. Raises ``CheckError`` (before any process starts) for bad input."""
    verdicts = [prepare(plan, world_sizes) for plan in plans]
    judge_worlds(verdicts, world_sizes, timeout)
    for v in verdicts:
        v.causes = diagnose(v)
    return verdicts


def check(specs: list[str], options: CheckOptions) -> list[Verdict]:
    """The command's check: every target trained the same way (``options``)."""
    return check_plans([plan for spec in specs for plan in options.plans(spec)], options.world_sizes,
                       options.timeout)
