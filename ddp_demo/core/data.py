"""Seeded built-in data, a user's ``(x, y)`` file, per-rank loading and exact evaluation.

The split of work across ranks lives here. With ``DistributedSampler`` every rank
draws the same seeded permutation and takes every N-th index starting at its rank;
with a per-rank batch of ``B / N``, the ranks' batches at step ``t`` are together
exactly positions ``t*B ... t*B+B-1`` of that permutation, whatever N is. That is
why a DDP run can equal a single-process run sample for sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ddp_demo.core.config import ConfigError
from ddp_demo.core.dist import DistContext, all_reduce_sum

N_TRAIN, N_HELDOUT = 4096, 1024


@dataclass(frozen=True)
class Task:
    """Train and held-out tensors plus what the model needs to know about them."""

    train: TensorDataset
    heldout: TensorDataset
    num_classes: int  # 0 for regression

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])


def _two_class(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """10 features; the class is which side of a curved boundary a point lies on."""
    x = torch.randn(n, 10, generator=g)
    score = x[:, 0] + 0.5 * x[:, 1] - 0.8 * x[:, 2] + 0.5 * (x[:, 3] ** 2 - 1)
    return x, (score > 0).long()


def _shapes(n: int, g: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """3x32x32 noisy images of three shape classes: horizontal bar, vertical bar, square."""
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    lo = torch.randint(2, size - 14, (n, 2), generator=g)
    colour = 0.5 + torch.rand(n, 3, generator=g)
    for i in range(n):
        r, c = lo[i].tolist()
        if y[i] == 0:
            rows, cols = slice(r, r + 3), slice(c, c + 12)
        elif y[i] == 1:
            rows, cols = slice(r, r + 12), slice(c, c + 3)
        else:
            rows, cols = slice(r, r + 7), slice(c, c + 7)
        x[i, :, rows, cols] += colour[i].view(3, 1, 1)
    return x, y


def _regression(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """y = 3x + small noise: MultiplyByTwo should learn a multiplier of 3."""
    x = torch.randn(n, generator=g)
    return x, 3.0 * x + 0.01 * torch.randn(n, generator=g)


# model -> (generator, number of classes; 0 for regression)
_BUILTIN = {"mlp": (_two_class, 2), "cnn": (_shapes, 3), "multiply": (_regression, 0)}


def builtin_task(model: str, seed: int, dtype: torch.dtype, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> Task:
    make, num_classes = _BUILTIN[model]
    x, y = make(n_train + n_heldout, torch.Generator().manual_seed(seed))
    return _split(x.to(dtype), y, n_train, num_classes)


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int, num_classes: int) -> Task:
    if num_classes == 0:
        y = y.to(x.dtype)
    return Task(TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]), num_classes)


def load_task(path: str, model: str, dtype: torch.dtype, seed: int) -> Task:
    """A user's ``torch.save((x, y), path)``; a seeded 80/20 train/held-out split."""
    try:
        obj = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--data {path}: no such file; pass a file written by torch.save((x, y), path)") from None
    except Exception as e:  # pickle errors, wrong format, truncated file
        raise ConfigError(f"--data {path}: not a readable torch file ({type(e).__name__}); "
                          "write it with torch.save((x, y), path)") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise ConfigError(f"--data {path}: expected a tuple (x, y) of two tensors; "
                          "save it with torch.save((x, y), path)")
    x, y = obj
    _check_shapes(path, model, x, y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].to(dtype), y[perm]
    num_classes = 0 if model == "multiply" else int(y.max()) + 1
    return _split(x, y, int(0.8 * len(x)), num_classes)


def _check_shapes(path: str, model: str, x: torch.Tensor, y: torch.Tensor) -> None:
    want = {"mlp": (2, "(N, features)"), "cnn": (4, "(N, channels, height, width)"), "multiply": (1, "(N,)")}[model]
    problem = None
    if x.dim() != want[0]:
        problem = f"x has shape {tuple(x.shape)} but --model {model} needs {want[1]}"
    elif y.dim() != 1 or len(y) != len(x):
        problem = f"y must be 1-D with one entry per row of x (x has {len(x)} rows, y shape {tuple(y.shape)})"
    elif len(x) < 10:
        problem = f"only {len(x)} samples; need at least 10 for a train/held-out split"
    elif not x.is_floating_point():
        problem = f"x has dtype {x.dtype}; it must be floating point"
    elif model != "multiply" and (y.is_floating_point() or y.min() < 0):
        problem = "y must hold non-negative integer class labels for a classifier"
    elif model == "multiply" and not y.is_floating_point():
        problem = "y must be floating point for the regression model"
    if problem:
        raise ConfigError(f"--data {path}: {problem}")


class _Batches(TensorDataset):
    """The same tensors, fetched a batch at a time: one indexing op per tensor.

    A DataLoader calls ``__getitems__`` with a whole batch's indices when the dataset has
    it, instead of ``dataset[i]`` once per sample followed by ``torch.stack``: the same
    numbers in the same order, without the per-sample Python work, which took about half
    of a small model's step here (issue 13, docs/performance.md).
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        at = torch.tensor(indices)
        return tuple(t[at] for t in self.tensors)


def _as_fetched(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch  # the collate step: __getitems__ already made the batch


def rank_loader(dataset: TensorDataset, ctx: DistContext, global_batch: int, seed: int) -> DataLoader:
    """This rank's share of every global batch: ``global_batch / world_size`` samples.

    ``drop_last=True`` on both the sampler and the loader: padding would repeat
    samples, and a short last batch would weigh its samples differently from a
    single process. Call ``loader.sampler.set_epoch(epoch)`` every epoch, or every
    epoch sees the same order (DistributedSampler docs).
    """
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    return DataLoader(_Batches(*dataset.tensors), batch_size=global_batch // ctx.world_size, sampler=sampler,
                      drop_last=True, collate_fn=_as_fetched)


@torch.no_grad()
def heldout_counts(model: torch.nn.Module, task: Task, ctx: DistContext, batch: int = 512) -> tuple[int, int]:
    """(correct, total) over all ranks' held-out shares, each sample counted exactly once.

    Rank r scores samples r, r+N, r+2N, ... (no padding, unlike DistributedSampler
    without drop_last), then the counts are summed with all_reduce. For regression a
    prediction counts as correct when within 0.1 of the target.
    """
    x, y = task.heldout.tensors
    mine = torch.arange(ctx.rank, len(x), ctx.world_size)
    correct = 0
    # Every rank runs the same number of forwards (some last ones empty): under fsdp each forward
    # all-gathers the parameters, a collective all ranks must join.
    for i in range(0, -(-len(x) // ctx.world_size), batch):
        idx = mine[i : i + batch]
        out = model(x[idx].to(ctx.device))
        target = y[idx].to(ctx.device)
        hits = (out - target).abs() < 0.1 if task.num_classes == 0 else out.argmax(1) == target
        correct += int(hits.sum())
    correct, total = all_reduce_sum([correct, len(mine)], ctx)
    return int(correct), int(total)
