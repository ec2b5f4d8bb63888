"""The loss and stop flag ride in DDP's gradient all-reduce (core/agree.py, issue 13).

One 2-rank process group (FileStore, timeout) trains the same 4 steps three ways: the bare
DDP loop, the trainer, and the trainer agreeing with an all-reduce of its own (the negative
control). Every ``dist.all_reduce`` is counted, DDP's buckets included (a counted copy of
torch's default hook; DDP is given several buckets, so only bucket 0 may carry the pair).
"""

from __future__ import annotations

import math

import pytest
import torch

from ddp_demo.core.config import TrainConfig
from ddp_demo.core.loop import NonFiniteLoss, Watch
from ddp_demo.proof.agreement import STEPS

from .helpers import agreement_and_autocast_ranks


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return [r["agreement"] for r in agreement_and_autocast_ranks()]  # one process group with test_precision.py's cases


def test_the_trainer_makes_no_collective_beyond_the_bare_loops(ranks):
    for r in ranks:
        bare, ours = r["bare"]["calls"], r["trainer"]["calls"]
        assert len(bare) > STEPS  # several buckets per step
        assert len(ours) == len(bare)
        assert sum(ours) == sum(bare) + 2 * STEPS  # the same buckets, bucket 0 two numbers longer


def test_with_scratch_ddp_too_the_pair_rides_in_its_buckets(ranks):
    """``--ddp scratch``: ddp_demo's own DDP takes the same hook (parallel/ddp.py, register_comm_hook);
    the control, agreeing with an all-reduce of its own, counts one more per step."""
    for r in ranks:
        bare, ours, control = (r["scratch"][k]["calls"] for k in ("bare", "trainer", "control"))
        assert len(bare) > STEPS and len(ours) == len(bare) and sum(ours) == sum(bare) + 2 * STEPS
        assert len(control) == len(bare) + STEPS
        assert torch.equal(r["scratch"]["trainer"]["grads"], r["scratch"]["bare"]["grads"])
        assert torch.equal(r["scratch"]["trainer"]["grads"], r["bare, DDP's C++ hook"]["grads"])


def test_negative_control_an_own_all_reduce_is_counted(ranks):
    for r in ranks:
        assert len(r["control"]["calls"]) == len(r["bare"]["calls"]) + STEPS


def test_carrying_the_pair_leaves_the_gradients_bit_identical(ranks):
    for r in ranks:
        ddp_own = r["bare, DDP's C++ hook"]["grads"]
        assert all(torch.equal(r[run]["grads"], ddp_own) for run in ("bare", "trainer", "control"))


def test_the_logged_loss_is_the_mean_of_the_ranks_losses(ranks):
    means = [sum(pair) / 2 for pair in zip(*(r["bare"]["local_losses"] for r in ranks), strict=True)]
    assert ranks[0]["bare"]["local_losses"] != ranks[1]["bare"]["local_losses"]  # the ranks' data differ
    for r in ranks:
        assert r["trainer"]["logged"] == pytest.approx(means, rel=1e-15, abs=0)
        assert r["control"]["logged"] == pytest.approx(means, rel=1e-15, abs=0)


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step(ranks):
    assert [r["stopped_at"] for r in ranks] == [2, 2]


def test_deferred_reads_name_the_first_non_finite_step():
    """CUDA reads only at logged steps: a NaN in between is remembered on the device."""
    watch = Watch(TrainConfig(steps=9, log_every=3), deferred=True)
    assert [s for s in range(1, 10) if watch.due(s)] == [3, 6, 9]
    watch.remember(1, torch.tensor([0.5, 0.0]))
    watch.remember(2, torch.tensor([math.nan, 0.0]))
    with pytest.raises(NonFiniteLoss, match="at step 2; stopped before saving"):
        watch.read(3, torch.tensor([0.7, 0.0]))  # finite again, but step 2 was not


def test_reads_on_the_cpu_happen_every_step_and_refuse_before_applying():
    watch = Watch(TrainConfig(steps=9, log_every=3), deferred=False)
    assert all(watch.due(s) for s in range(1, 10))
    assert watch.read(1, torch.tensor([0.5, 1.0])) == (0.5, True)
    with pytest.raises(NonFiniteLoss, match="at step 2; stopped before applying"):
        watch.read(2, torch.tensor([math.inf, 0.0]))
