"""``python -m ddp_demo.check --strategy`` and ``assert_ddp_equivalent(strategy=...)``: the user's
model trained under zero and fsdp (strategy.wrap) equals one process, and BatchNorm under fsdp is
named as buffers left per rank, with its fix. The control is the unconverted BatchNorm model,
which must fail; the converted one (``build_synced``) must pass under both strategies.

``--reduce-dtype``: fsdp reducing an MLP's float64 gradients in float32 is named with its measured
effect (against the same run reducing in float64, in the same processes); the control is that same
run reducing in float64, which passes and says nothing of a reduce dtype. All the fsdp cases share
one set of processes at N = 2.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ddp_demo.check import check_plans
from ddp_demo.check.engine import Plan
from ddp_demo.check.options import CheckOptions
from ddp_demo.check.report import text
from ddp_demo.core.models import MLP
from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP
from ddp_demo.parallel.strategy import StrategyConfig
from ddp_demo.testing import assert_ddp_equivalent

BN = "examples/check/batchnorm_cnn.py:"
MLP_TARGET = "tests.test_check_strategy:build_mlp"


def build_mlp():
    """The article's MLP on 8 samples of 4 features, 3 classes."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    return MLP(4, 16, 3), (x, torch.randint(0, 3, (8,))), torch.nn.functional.cross_entropy


@functools.cache
def fsdp_verdicts() -> dict:
    plans = {"bn": Plan(BN + "build", strategy="fsdp"), "bn_synced": Plan(BN + "build_synced", strategy="fsdp"),
             "lower": Plan(MLP_TARGET, strategy="fsdp", reduce_dtype="float32"),
             "own": Plan(MLP_TARGET, strategy="fsdp"),
             # a recipe under bf16 autocast, its reductions in bfloat16: measured against the bf16 bound
             "recipe_bf16": Plan("examples/check/recipe.py:build", strategy="fsdp", reduce_dtype="bfloat16")}
    return dict(zip(plans, check_plans(list(plans.values()), (2,), timeout=240), strict=True))


def test_batchnorm_under_fsdp_is_buffers_per_rank_and_conversion_fixes_it():
    plain, synced = fsdp_verdicts()["bn"], fsdp_verdicts()["bn_synced"]
    assert not plain.ok and plain.causes[0].key == "buffers_per_rank", text(plain)
    assert "1.running_mean" in plain.causes[0].names and "convert_sync_batchnorm" in plain.causes[0].fix
    assert "--strategy fsdp" in text(plain)
    assert synced.ok, text(synced)


def test_lower_reduce_dtype_is_named_with_its_measured_effect():
    v = fsdp_verdicts()["lower"]
    (effect,) = v.reduce_effects
    tol = STEP["float64"].atol
    # The reduce dtype's own effect misses by far more than the margin; reducing in float64 stays inside.
    assert effect.world_size == 2 and not effect.ok and effect.moved > CONTROL_MARGIN * tol, effect
    assert effect.baseline <= tol, effect
    # ... and it is what the failing verdict shows: the lower run's parameters against one process.
    against_one = max(r.max_abs_diff for r in v.worlds[0].rows if r.kind == "parameter" and r.stage == "after_steps")
    assert abs(effect.moved - against_one) <= tol
    assert not v.ok and v.causes[0].key == "reduce_dtype" and "drop --reduce-dtype" in v.causes[0].fix, text(v)
    assert (f"N=2: fsdp reduce-scattered gradients in float32, below the parameters' float64: that alone moved the "
            f"parameters by {effect.moved:.2g} (reducing in float64: {effect.baseline:.2g}); over the float64 "
            "tolerance 1e-12") in text(v)


def test_a_bf16_recipes_lower_reduce_dtype_is_measured_against_its_bf16_bound():
    """The recipe's tolerance is autocast's bound, not a dtype's step tolerance (it once raised a KeyError)."""
    v = fsdp_verdicts()["recipe_bf16"]
    (effect,) = v.reduce_effects
    assert effect.world_size == 2 and effect.moved > 0, effect
    assert "fsdp reduce-scattered gradients in bfloat16" in text(v), text(v)


def test_reducing_in_the_parameters_dtype_passes_and_names_no_reduce_dtype():
    v = fsdp_verdicts()["own"]
    assert v.ok and not v.reduce_effects and not v.causes, text(v)
    assert "reduce" not in text(v)


def test_reduce_dtype_goes_to_fsdp_only_and_into_its_policy():
    ddp, zero, fsdp = CheckOptions(strategy="all", reduce_dtype="bfloat16").plans("t.py:build")
    assert (ddp.reduce_dtype, zero.reduce_dtype, fsdp.reduce_dtype) == (None, None, "bfloat16")
    assert StrategyConfig("fsdp", reduce_dtype="float32").policy().reduce_dtype == torch.float32
    assert StrategyConfig("fsdp").policy().reduce_dtype is None
    bf16 = StrategyConfig("fsdp", precision="bf16", reduce_dtype="bfloat16").policy()
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("cfg", [dict(name="ddp"), dict(name="zero"), dict(name="fsdp", ddp_impl="scratch")])
def test_a_reduce_dtype_outside_fully_shard_is_refused(cfg):
    with pytest.raises(ValueError, match="needs strategy fsdp with torch's implementation"):
        StrategyConfig(**cfg, reduce_dtype="float32")


def test_assert_ddp_equivalent_under_zero():
    assert_ddp_equivalent(BN + "build_synced", world_sizes=(2,), strategy="zero", timeout=240)
