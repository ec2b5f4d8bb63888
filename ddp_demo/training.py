"""The training step and loop shared by every launcher.

Nothing here knows how processes were started: the caller passes a model that is
already wrapped (``DistributedDataParallel`` for torchrun) and, if needed, its own
``backward``. The loop is the same single-process loop people already know.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import TrainConfig
from .data import Task
from .dist import DistContext

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    return torch.optim.Adam(params, lr=cfg.lr)


def loss_function(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A *mean* over the local batch. DDP averages gradients over ranks, so the mean of
    N equal-sized local means is the mean over the global batch: the same gradient a
    single process computes (DDP docs, "gradients are averaged")."""
    return F.mse_loss if task.num_classes == 0 else F.cross_entropy


def epoch_batches(loader: DataLoader, steps: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``steps`` batches, moving to a new epoch (and a new shuffle) as needed."""
    epoch, done = 0, 0
    while done < steps:
        loader.sampler.set_epoch(epoch)  # a new, seed+epoch permutation, the same on every rank
        for batch in loader:
            yield epoch, batch
            done += 1
            if done == steps:
                return
        epoch += 1


@dataclass
class StepLog:
    step: int
    loss: float
    samples_per_s: float


def global_mean(value: torch.Tensor, ctx: DistContext) -> float:
    """The loss averaged over ranks: the loss of the whole global batch."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: Callable,
    cfg: TrainConfig,
    ctx: DistContext,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> list[StepLog]:
    """Run ``cfg.steps`` optimizer steps; rank 0 shows a progress bar."""
    logs: list[StepLog] = []
    bar = tqdm(total=cfg.steps, disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    for step, (_, (x, y)) in enumerate(epoch_batches(loader, cfg.steps), start=1):
        start = time.perf_counter()
        x, y = x.to(ctx.device), y.to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(model, "no_sync", contextlib.nullcontext) if cfg.skip_grad_sync else contextlib.nullcontext
        with no_sync():
            loss = loss_fn(model(x), y)  # no_sync must be entered before forward (DDP docs)
            backward(loss)  # DDP all-reduces gradient buckets while backward runs
        optimizer.step()
        loss_value = global_mean(loss, ctx)
        rate = cfg.global_batch_size / (time.perf_counter() - start)
        logs.append(StepLog(step, loss_value, rate))
        bar.set_postfix(loss=f"{loss_value:.4f}", samples_per_s=f"{rate:,.0f}")
        bar.update()
    bar.close()
    return logs
