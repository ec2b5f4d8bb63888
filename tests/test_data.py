"""How the global batch is split: the sampler union property, epochs, exact held-out counting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from ddp_demo.core.data import builtin_task, heldout_counts, rank_loader
from ddp_demo.core.dist import DistContext
from ddp_demo.core.loop import epoch_batches
from ddp_demo.core.spawn import run_on_ranks

GLOBAL_BATCH = 24


def fake_ctx(rank: int, world_size: int) -> DistContext:
    """The sampler only needs rank and world size: no process group required."""
    return DistContext(rank, rank, world_size, torch.device("cpu"), "gloo")


def ids_dataset(n: int = 100) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.zeros(n))


def global_batches(world_size: int, steps: int, ctx=fake_ctx) -> list[list[int]]:
    """The union, over ranks, of the sample ids each rank sees at every step."""
    dataset = ids_dataset()
    per_rank = []
    for rank in range(world_size):
        loader = rank_loader(dataset, ctx(rank, world_size), GLOBAL_BATCH, seed=7)
        per_rank.append([batch[0].tolist() for *_, batch in epoch_batches(loader, steps)])
    return [sorted(sum((per_rank[r][t] for r in range(world_size)), [])) for t in range(steps)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_step_sees_the_same_samples_whatever_the_world_size(world_size):
    steps = 10  # 100 samples / 24 per step = 4 steps an epoch: this crosses two epoch boundaries
    assert global_batches(world_size, steps) == global_batches(1, steps)


def test_every_step_is_a_full_global_batch_without_repeats():
    for batch in global_batches(3, 8):
        assert len(batch) == GLOBAL_BATCH and len(set(batch)) == GLOBAL_BATCH


def test_each_epoch_sees_distinct_samples_and_a_new_order():
    batches = global_batches(1, 8)  # 4 steps an epoch
    epochs = [sum(batches[0:4], []), sum(batches[4:8], [])]
    assert all(len(set(e)) == len(e) == 4 * GLOBAL_BATCH for e in epochs)
    assert batches[0:4] != batches[4:8], "set_epoch must reshuffle every epoch"


def test_reported_sample_ids_are_the_batch_contents():
    """epoch_batches names each batch's dataset indices (what --record-samples logs)."""
    loader = rank_loader(ids_dataset(), fake_ctx(1, 3), GLOBAL_BATCH, seed=7)
    for step, epoch, ids, batch in epoch_batches(loader, 6):
        assert ids == batch[0].tolist() and epoch == (step - 1) // 4


def test_resuming_mid_epoch_continues_the_same_sequence():
    loader = rank_loader(ids_dataset(), fake_ctx(0, 2), GLOBAL_BATCH, seed=7)
    full = [ids for _, _, ids, _ in epoch_batches(loader, 10)]
    resumed = [ids for _, _, ids, _ in epoch_batches(loader, 10, start_step=6)]
    assert resumed == full[6:]


def test_pytorch_behaviour_sampler_repeats_its_order_without_set_epoch():
    """A PyTorch behaviour the design relies on (DistributedSampler docs): the order is
    drawn from seed + epoch, so without ``set_epoch`` every epoch repeats the first one's.
    That is why ``epoch_batches`` calls it each epoch (its test is the one above)."""
    loader = rank_loader(ids_dataset(), fake_ctx(0, 1), GLOBAL_BATCH, seed=7)
    first = [b[0].tolist() for b in loader]
    second = [b[0].tolist() for b in loader]  # no set_epoch in between
    assert first == second


def test_negative_control_union_check_catches_ranks_doing_the_same_work():
    """The union check above fails when the ranks do not split the batch: here every
    rank takes rank 0's share, so each step repeats half a batch and misses the rest."""
    duplicated = global_batches(2, 10, ctx=lambda rank, n: fake_ctx(0, n))
    for got, want in zip(duplicated, global_batches(1, 10), strict=True):
        assert len(got) == GLOBAL_BATCH and len(set(got)) == GLOBAL_BATCH // 2 and got != want


def _counts_on_rank(ctx, n_heldout):
    task = builtin_task("mlp", 0, torch.float32, n_train=8, n_heldout=n_heldout)
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 2)
    return heldout_counts(model, task, ctx, batch=16)


@pytest.mark.parametrize("world_size", [2, 3])
def test_heldout_accuracy_counts_every_sample_exactly_once(world_size):
    n = 100  # not divisible by 3: DistributedSampler would pad with duplicates here
    single = _counts_on_rank(fake_ctx(0, 1), n)
    per_rank = run_on_ranks(_counts_on_rank, world_size, (n,), timeout=120)
    assert single[1] == n
    assert all(counts == single for counts in per_rank)


def test_pytorch_behaviour_padded_sampler_would_count_duplicates():
    """A PyTorch behaviour the design relies on: without ``drop_last`` DistributedSampler
    pads with repeated samples to make the shares equal. That is why ``heldout_counts``
    deals the held-out samples itself instead of using it."""
    n, world = 100, 3
    seen = sum(len(list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)))
               for r in range(world))
    assert seen == 102 != n
