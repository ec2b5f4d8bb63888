"""How close counts as equal: the one table of tolerances, and the one rule that applies them.

**The rule is per tensor**: a tensor matches when ``max |got - want| <= atol + rtol * max |want|``,
the maximum over its elements (and, where ranks are compared, over every rank). The scale is the
tensor's largest value, not each element's, because rounding in a sum (the all-reduce, a matrix
product) grows with the size of the terms summed, not with the result: an element that cancels
to nearly zero still carries the rounding of its large terms, and a per-element ``rtol`` would
call that a difference (the deep models of ``python -m ddp_demo.check`` have such elements;
docs/check.md). Per tensor is never stricter than per element, and with ``rtol = 0`` (float64)
the two are the same. ``proof/cases.py`` and ``check/verdict.py`` both judge by :func:`within`.

**The table** (:data:`TOLERANCES`) holds every bound the proofs, the check and the tests use,
per check and per dtype; why each is what it is: docs/equivalence.md, docs/check.md and
``proof/autocast.py`` (the bf16 bound's derivation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """``atol + rtol * scale``, where the scale is the largest ``|value|`` of the tensor compared."""

    atol: float
    rtol: float = 0.0

    def at(self, scale: float) -> float:
        return self.atol + self.rtol * scale

    def bound(self, want: torch.Tensor | None) -> float:
        """The largest difference ``want``'s tensor may show."""
        return self.at(0.0 if want is None or not want.numel() else float(want.abs().max()))


U_BF16 = 2.0**-8  # unit roundoff of bf16: 8 significant bits
BF16_BOUND_FACTOR = 4.0  # 2u from the two roundings proof/autocast.py derives, doubled for forward rounding flips

TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # One step: gradients after a backward, values after a few optimizer steps (proof/cases.py, check/)
    "step": {"float64": Tolerance(1e-12), "float32": Tolerance(1e-6, 1e-5)},
    # A whole run (final.pt and every logged loss) at N processes against one: only the summation
    # order differs, over hundreds of steps (tests/test_train.py, test_slurm.py, test_examples.py)
    "whole_run": {"float64": Tolerance(1e-10)},
    # bf16 autocast over float32 parameters; the scale is the largest per-rank gradient (proof/autocast.py)
    "bf16_autocast": {"float32": Tolerance(0.0, BF16_BOUND_FACTOR * U_BF16)},
    # CUDA against the CPU, one step: rounding (~1e-16) in another summation order, with room (bench/gpu_check.py)
    "cuda_vs_cpu": {"float64": Tolerance(1e-10)},
}
STEP = TOLERANCES["step"]
WHOLE_RUN_BY_DTYPE = TOLERANCES["whole_run"]
WHOLE_RUN = WHOLE_RUN_BY_DTYPE["float64"].atol
BF16 = TOLERANCES["bf16_autocast"]["float32"]

# A negative control must miss by at least this many tolerances: failing by a hair would not
# show that the comparison separates synced from unsynced training.
CONTROL_MARGIN = 100
BF16_CONTROL_MARGIN = 8.0  # the bf16 bound is derived, not measured: the control must miss it 8 times over


def difference(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """``max |got - want|``; inf for a tensor on one side only, a shape mismatch or a non-finite value."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return math.inf
    diff = float((got.to(want.dtype) - want).abs().max()) if want.numel() else 0.0
    return diff if math.isfinite(diff) else math.inf


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(difference(got[k], want[k]) for k in want)


def tolerances_off(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: Tolerance) -> float:
    """How many tolerances apart the two are, the worst tensor's: at most 1 is :func:`within`;
    a negative control must reach :data:`CONTROL_MARGIN`."""
    assert got.keys() == want.keys()
    return max(difference(got[k], want[k]) / tol.bound(want[k]) for k in want)


def within(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: Tolerance) -> bool:
    """Every tensor within its bound: the rule above."""
    assert got.keys() == want.keys()
    return all(difference(got[k], want[k]) <= tol.bound(want[k]) for k in want)
