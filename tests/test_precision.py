"""--precision bf16: DDP under autocast equals one process under autocast within a derived bound.

ddp_demo/proof/autocast.py derives the bound (bf16's unit roundoff u = 2^-8, two roundings
of a batch sum, doubled for forward rounding flips) and runs every model at N = 2 in one
process group. The negative control, each rank's own gradient without the all-reduce,
must miss the same bound by a wide margin.
"""

from __future__ import annotations

import functools
import json

import pytest

from ddp_demo import train as trainer
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import BF16_CONTROL_MARGIN, U_BF16
from ddp_demo.proof.autocast import verdicts as autocast_verdicts

from .helpers import agreement_and_autocast_ranks


@functools.cache
def verdicts() -> dict:
    # one process group with test_agree.py's cases
    return autocast_verdicts([r["autocast"] for r in agreement_and_autocast_ranks()])


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_ddp_under_bf16_autocast_is_within_the_bound(model):
    v = verdicts()[model]
    assert v["ddp_over_bound"] <= 1.0, v


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_negative_control_unsynced_gradients_miss_the_bound_by_a_margin(model):
    v = verdicts()[model]
    assert v["control_over_bound"] >= BF16_CONTROL_MARGIN, v


def test_bf16_really_rounds():
    """The bound is not loose for nothing: bf16 moves the MLP's gradient far more than
    float32 rounding could (1e-6 is float32's tolerance in docs/equivalence.md)."""
    assert verdicts()["mlp"]["max_abs_diff"] > 1e-6
    assert U_BF16 == 2.0**-8


def test_a_whole_bf16_run_logging_every_7th_step(tmp_path, monkeypatch):
    """Plain python, one process (--log-every is core/agree's too: every 7th step and the last)."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert trainer.main(["--precision", "bf16", "--steps", "30", "--log-every", "7", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["precision"] == "bf16" and summary["heldout_accuracy"] > 0.6
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [7, 14, 21, 28, 30]
