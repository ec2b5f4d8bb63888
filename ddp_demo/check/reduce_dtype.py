"""``--reduce-dtype``: fsdp reduce-scatters the gradients in a dtype below the parameters', and
the check measures what that alone does.

FSDP2's ``MixedPrecisionPolicy(reduce_dtype=...)`` casts each gradient to that dtype for the
reduce-scatter and back after it (torch.distributed.fsdp docs, MixedPrecisionPolicy), so the
average over the ranks is rounded to it. To isolate that rounding from everything else fsdp
does, the same processes also train the same fsdp run reducing in the parameters' own dtype
(its *baseline*, :func:`with_baselines`: no extra launch). The effect at N is the largest
difference between the two runs' parameters after the steps, judged by the check's one rule
(core/tolerances.py) with the checked dtype's step tolerance. The check's verdict itself is the
usual one (the lower-reduce run against one process); diagnose.py names the reduce dtype as the
cause when its effect is over the tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ddp_demo.check.engine import Plan, Trained
from ddp_demo.check.target import CheckError, Target
from ddp_demo.check.verdict import Verdict, compare, step_tolerance


@dataclass(frozen=True)
class Effect:
    """What reducing in ``Plan.reduce_dtype`` did at one world size."""

    world_size: int
    moved: float  # max |lower-reduce run - baseline run| over the parameters after the steps
    baseline: float  # max |baseline run - one process| over the same: what fsdp alone leaves
    ok: bool  # every parameter of the lower-reduce run within its tolerance of the baseline's


def check_lower(plan: Plan, target: Target) -> None:
    """Bad input (before any process): a reduce dtype not below the checked parameters' dtype."""
    if plan.reduce_dtype == "float32" and target.dtype == torch.float32:
        raise CheckError(f"--reduce-dtype float32 is not lower than {plan.spec}'s float32 parameters (--dtype keep), "
                         "so it measures nothing; use --reduce-dtype bfloat16, or --dtype float64")


def with_baselines(plans: list[Plan]) -> list[Plan]:
    """``plans``, then for each that reduces in a lower dtype the same plan reducing in the parameters' own."""
    return plans + [dataclasses.replace(p, reduce_dtype=None) for p in plans if p.reduce_dtype]


def _worst_parameter(want: Trained, ranks: list[dict], v: Verdict) -> tuple[float, bool]:
    params = {name for name, _ in v.target.model.named_parameters()}
    rows = [r for r in compare(want, ranks, params, step_tolerance(v.tolerance["dtype"]), v.tolerance["adam_allowance"])
            if r.kind == "parameter" and r.stage == "after_steps"]
    return max((r.max_abs_diff for r in rows), default=0.0), all(r.ok for r in rows)


def measure(v: Verdict, n: int, ranks: list[dict], baseline: list[dict]) -> Effect | None:
    """The effect at ``n`` from both runs' results (None when either run failed)."""
    if any("error" in r for r in ranks + baseline):
        return None
    moved, ok = _worst_parameter(Trained(baseline[0]["grads"], baseline[0]["after"]), ranks, v)
    return Effect(n, moved, _worst_parameter(v.reference, baseline, v)[0], ok)


def attach(verdicts: list[Verdict], n: int, baselines: list[list[dict]], results: list[list[dict]]) -> None:
    """Each lower-reduce verdict's effect at ``n``; ``results`` and ``baselines`` in with_baselines' order."""
    lowered = [(v, ranks) for v, ranks in zip(verdicts, results, strict=True) if v.plan.reduce_dtype]
    for (v, ranks), base in zip(lowered, baselines, strict=True):
        effect = measure(v, n, ranks, base)
        if effect is not None:
            v.reduce_effects.append(effect)


def tolerance_words(v: Verdict) -> str:
    tol = v.tolerance
    bound = f"{tol['atol']:g}" if not tol["rtol"] else f"({tol['atol']:g} + {tol['rtol']:g} x max |value|)"
    return f"the {tol['dtype']} tolerance {bound}"


def line(v: Verdict, e: Effect) -> str:
    dtype = v.tolerance["dtype"]
    return (f"N={e.world_size}: fsdp reduce-scattered gradients in {v.plan.reduce_dtype}, below the parameters' "
            f"{dtype}: that alone moved the parameters by {e.moved:.2g} (reducing in {dtype}: {e.baseline:.2g}); "
            f"{'within' if e.ok else 'over'} {tolerance_words(v)}")


def lines(v: Verdict) -> list[str]:
    return [line(v, e) for e in v.reduce_effects]
