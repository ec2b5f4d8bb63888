"""The runs judged: every tensor compared, per world size; the verdict holds the results.

The entry (``check/__init__.py``) walks one way: ``target`` (bad input, before any process)
-> ``engine`` (the runs) -> here (each tensor judged) -> ``diagnose`` -> ``report``. This module
starts nothing; it only holds and judges what the engine returned.

A tensor matches by the one rule of ``core/tolerances.py`` (per tensor:
``max |DDP - one process| <= atol + rtol * max |one process|`` over all its elements and every
rank), with the step tolerances for its dtype; why they hold for deep models: docs/check.md.
With Adam the values after the steps get a stated allowance on top (:func:`adam_allowance`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ddp_demo.check.engine import Plan, Trained, steps_of
from ddp_demo.check.stalled import one_line
from ddp_demo.check.target import Target
from ddp_demo.core.tolerances import BF16, STEP, Tolerance, difference


@dataclass
class Row:
    """One tensor at one world size: its largest difference over all ranks, and the bound."""

    name: str
    kind: str  # "parameter" or "buffer"
    stage: str  # "gradient" (after the first backward) or "after_steps"
    max_abs_diff: float  # inf: a gradient on one side only, a shape mismatch or a non-finite value
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class World:
    """The result at one world size."""

    world_size: int
    seconds: float
    rows: list[Row] = field(default_factory=list)
    error: str | None = None  # a traceback, or why the processes returned nothing
    unused: list[str] = field(default_factory=list)  # parameters some rank gave no gradient
    ranks: list[dict] = field(default_factory=list, repr=False)  # the raw tensors (for the diagnosis)

    @property
    def numbers_match(self) -> bool:
        return self.error is None and all(r.ok for r in self.rows)


@dataclass
class Cause:
    """A cause of a difference, named with its fix (diagnose.py, diagnose_step.py)."""

    key: str  # unused_parameters, batchnorm, randomness, summed_loss, error, not_recognised, the step's (docs)
    title: str
    why: str
    fix: str
    names: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    plan: Plan
    target: Target  # a fresh build, for describing the model and diagnosing it
    reference: Trained = field(repr=False)
    tolerance: dict
    worlds: list[World] = field(default_factory=list)
    causes: list[Cause] = field(default_factory=list)  # filled in by diagnose when the check fails
    reduce_effects: list = field(default_factory=list)  # reduce_dtype.Effect per N, under --reduce-dtype

    @property
    def steps(self) -> int:
        return steps_of(self.plan, self.target.recipe)

    @property
    def ok(self) -> bool:
        unused = any(w.unused for w in self.worlds) and not self.plan.find_unused_parameters
        return all(w.numbers_match for w in self.worlds) and not unused

    def first_failure(self) -> tuple[World, Row | None] | None:
        """The first world size (ascending) that fails, and its first differing tensor by name order."""
        for world in sorted(self.worlds, key=lambda w: w.world_size):
            if world.error or (world.unused and not self.plan.find_unused_parameters):
                return world, None
            bad = [r for r in world.rows if not r.ok]
            if bad:
                return world, bad[0]
        return None


def adam_allowance(reference: Trained, tol: Tolerance, relative: bool = False) -> float:
    """Added to the tolerance of every value after the steps of an optimizer of Adam's family.

    Adam steps by ``lr * m / (sqrt(v) + eps)``. Where a parameter's exact gradient is zero (a
    bias just before BatchNorm, the key bias of attention), its computed gradient is rounding,
    and Adam turns it into a step of up to ``lr``, in a direction rounding chose. The step's
    slope in ``g`` is at most ``1 / eps``, and a step is at most ``lr`` either way, so gradients
    that differ by ``atol`` move a value by at most ``lr * min(2, atol / eps)`` per step, summed
    over the steps' learning rates (a schedule changes them). A ``relative`` bound (bf16 autocast)
    has no floor near zero: a full step either way. Measured in docs/check.md: float64 stays far
    inside it; float32 uses half of it.
    """
    if reference.adam_eps is None:
        return 0.0
    return sum(reference.lrs) * (2.0 if relative else min(2.0, tol.atol / reference.adam_eps))


def step_tolerance(name: str) -> Tolerance:
    """``float64``, ``float32`` (the proofs' step tolerances) or ``bf16_autocast`` (proof/autocast.py's bound)."""
    return BF16 if name == "bf16_autocast" else STEP[name]


def tolerance_for(reference: Trained, target: Target) -> dict:
    """The tolerance of the target's least precise dtype (bf16 under the recipe's autocast), and Adam's
    allowance (as the report shows them)."""
    if target.recipe.autocast is not None:
        name = "bf16_autocast"
    else:
        name = "float32" if target.dtype == torch.float32 else "float64"
    tol = step_tolerance(name)
    allowance = adam_allowance(reference, tol, relative=name == "bf16_autocast")
    return {"dtype": name, **dataclasses.asdict(tol), "adam_allowance": allowance}


def compare(want: Trained, ranks: list[dict], params: set[str], tol: Tolerance, allowance: float = 0.0) -> list[Row]:
    rows = []
    for stage, ref in (("gradient", want.grads), ("after_steps", want.after)):
        for name, w in ref.items():
            bound = tol.bound(w) + (allowance if stage == "after_steps" else 0.0)
            rows.append(Row(name, "parameter" if name in params else "buffer", stage,
                            max(difference(r["grads" if stage == "gradient" else "after"].get(name), w) for r in ranks),
                            bound))
    return rows


def judge(v: Verdict, n: int, seconds: float, ranks: list[dict]) -> World:
    """The world of ``n`` processes from every rank's result for this verdict's target."""
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(ranks) if "error" in res]
    if errors:  # the first line names the rank that raised first, its step and what it did last
        first = one_line([res["where"] for res in ranks if "where" in res])
        return World(n, seconds, error="\n".join([first, *errors]))
    params = {name for name, _ in v.target.model.named_parameters()}
    unused = sorted({name for names in ranks[0]["unused"] for name in names})
    rows = compare(v.reference, ranks, params, step_tolerance(v.tolerance["dtype"]), v.tolerance["adam_allowance"])
    return World(n, seconds, rows, unused=unused, ranks=ranks)
