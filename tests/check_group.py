"""The targets tests/test_check.py and tests/test_check_recipe.py read verdicts of, checked in
one set of processes per world size (start-up costs seconds; a target, milliseconds)."""

from __future__ import annotations

import functools

import torch

from ddp_demo.check import check_plans
from ddp_demo.check.engine import Plan

EX = "examples/check"
PASSING = ["transformer.py:build", "lstm.py:build", "batchnorm_cnn.py:build_synced", "dropout.py:build_eval",
           "unused.py:build_frozen", "summed_loss.py:build_mean"]
FAILING = {"batchnorm_cnn.py:build": "batchnorm", "dropout.py:build": "randomness",
           "unused.py:build": "unused_parameters", "unused.py:build_sometimes": "unused_parameters",
           "summed_loss.py:build": "summed_loss",
           "batch_centred.py:build": "not_recognised"}
EXTRA = {  # the same engine with the command's other flags, in the same processes
    "adam": Plan(f"{EX}/batchnorm_cnn.py:build_synced", optimizer="adam"),
    "float32": Plan(f"{EX}/transformer.py:build", dtype="keep"),
    "find_unused": Plan(f"{EX}/unused.py:build", find_unused_parameters=True),
}
RAISES = Plan("tests.check_group:build_whole_batch_only")  # fails under DDP only, before the targets after it


class WholeBatchOnly(torch.nn.Linear):
    def forward(self, x):
        if len(x) != 24:
            raise ValueError(f"this model takes batches of 24, got {len(x)}")
        return super().forward(x)


def build_whole_batch_only():
    torch.manual_seed(0)
    x = torch.randn(24, 3)
    return WholeBatchOnly(3, 1), (x, x.sum(dim=1, keepdim=True)), torch.nn.functional.mse_loss


S = "step_bugs.py:"
STEP_PASSING = [S + "right", S + "same_seed", "recipe.py:build_float64", "recipe.py:build_own_step"]
STEP_FAILING = {S + "module_forward": "module_forward", S + "undivided": "undivided_loss",
                S + "all_in_no_sync": "last_in_no_sync", S + "lr_scaled": "lr_scaled",
                S + "rank_seeded_torch": "rank_randomness", S + "rank_seeded_numpy": "rank_randomness",
                S + "rank_seeded_random": "rank_randomness", S + "clip_local": "local_gradients",
                S + "decay_local": "local_gradients"}
BF16 = {  # the recipe people train with (bf16 autocast) under each strategy, and its control
    **{f"bf16_{s}": Plan(f"{EX}/recipe.py:build", strategy=s) for s in ("ddp", "zero", "fsdp")},
    "bf16_control": Plan(f"{EX}/recipe.py:build_control"),
}


@functools.cache
def verdicts() -> dict:
    """Every target above, checked at N = 2 and 3: one set of processes per N runs them all."""
    names = [*PASSING, *FAILING, *STEP_PASSING, *STEP_FAILING]
    plans = {"raises": RAISES} | {name: Plan(f"{EX}/{name}") for name in names} | EXTRA | BF16
    return dict(zip(plans, check_plans(list(plans.values()), (2, 3), timeout=200), strict=True))


