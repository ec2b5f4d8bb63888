"""Check your own model: DDP on N processes equals one process, or the reason it does not.

    python -m ddp_demo.check path/to/file.py:build --world-sizes 2,3

``target`` loads and validates the function you name (it returns ``(model, batch, loss_fn)``);
``engine`` trains it under real DDP on N gloo processes and in one process; ``verdict``
compares every tensor; ``diagnose`` names the cause of a difference; ``report`` prints it or
writes it as JSON. ``ddp_demo.testing.assert_ddp_equivalent`` runs the same check in pytest.
Design, tolerances and the JSON format: docs/check.md.
"""

from __future__ import annotations

from ddp_demo.check.diagnose import diagnose
from ddp_demo.check.engine import Plan
from ddp_demo.check.options import CheckOptions
from ddp_demo.check.verdict import Verdict, prepare, run_checks


def check_plans(plans: list[Plan], world_sizes: tuple[int, ...], timeout: float = 120.0) -> list[Verdict]:
    """Check every plan (a target and how to train it) at every world size; one set of processes
    per N runs them all. Raises ``CheckError`` (before any process starts) for bad input."""
    verdicts = [prepare(plan, world_sizes) for plan in plans]
    run_checks(verdicts, world_sizes, timeout)
    for v in verdicts:
        v.causes = diagnose(v)
    return verdicts


def check(specs: list[str], options: CheckOptions) -> list[Verdict]:
    """The command's check: every target trained the same way (``options``)."""
    return check_plans([options.plan(spec) for spec in specs], options.world_sizes, options.timeout)
