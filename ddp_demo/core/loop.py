"""The training step and loop shared by every launcher.

Nothing here knows how processes were started: the caller passes a model that is
already wrapped (``DistributedDataParallel`` for torchrun) and, if needed, its own
:class:`~ddp_demo.core.accumulate.GradSync` (how a micro-batch syncs its gradients). The
loop is the same single-process loop people already know.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ddp_demo.core.accumulate import GradSync, accumulate_gradients, ddp_grad_sync
from ddp_demo.core.config import TrainConfig
from ddp_demo.core.data import Task
from ddp_demo.core.dist import DistContext


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    return torch.optim.Adam(params, lr=cfg.lr)


def loss_function(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A *mean* over the local batch. DDP averages gradients over ranks, so the mean of
    N equal-sized local means is the mean over the global batch: the same gradient a
    single process computes (DDP docs, "gradients are averaged")."""
    return F.mse_loss if task.num_classes == 0 else F.cross_entropy


def epoch_batches(loader: DataLoader, steps: int, start_step: int = 0) -> Iterator[tuple[int, int, list[int], list]]:
    """Yield ``(step, epoch, sample_ids, batch)`` for steps ``start_step + 1 ... steps``.

    Every epoch is exactly ``len(loader)`` steps, so step s lives at a fixed (epoch,
    position): a resumed run re-enters the same epoch at the same place and sees the
    same samples as an uninterrupted one, whatever the world size.
    """
    per_epoch, step = len(loader), start_step
    per_rank = loader.batch_size
    while step < steps:
        epoch, position = divmod(step, per_epoch)
        loader.sampler.set_epoch(epoch)  # a new, seed+epoch permutation, the same on every rank
        order = list(loader.sampler)  # the indices the loader is about to fetch, in order
        for i, batch in enumerate(loader):
            if i < position:
                continue  # already trained on before the restart (in-memory data: cheap to skip)
            step += 1
            yield step, epoch, order[i * per_rank : (i + 1) * per_rank], batch
            if step == steps:
                return


@dataclass
class StepLog:
    step: int
    loss: float
    samples_per_s: float
    sample_ids: list[list[int]] | None = None  # with --record-samples: each rank's dataset indices, by rank

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"the loss is {value} at step {step}; stopped before applying that step")
        self.step = step


class StopRequested(Exception):
    """A signal asked every rank to stop; raised on all ranks at the same step boundary."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a signal after step {step}")
        self.step = step


def sync_step_stats(loss: torch.Tensor, stop: bool, ctx: DistContext) -> tuple[float, bool]:
    """One all-reduce per step carries two things every rank must agree on: the loss of
    the whole global batch (the mean of the ranks' means) and whether any rank was asked
    to stop. Agreeing on both keeps every rank at the same step when the run ends."""
    stats = torch.tensor([float(loss.detach()), float(stop)], dtype=torch.float64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(stats)
        stats[0] /= ctx.world_size
    return float(stats[0]), bool(stats[1] > 0)


def gather_ids(ids: list[int], ctx: DistContext) -> list[list[int]]:
    """Every rank's sample ids for this step, by rank (test/record mode): kept apart so a
    check can see that the ranks' shares are disjoint, B / N each, and make up the batch."""
    if not dist.is_initialized():
        return [list(ids)]
    every: list = [None] * ctx.world_size
    dist.all_gather_object(every, list(ids))
    return every


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: Callable,
    cfg: TrainConfig,
    ctx: DistContext,
    grad_sync: GradSync | None = None,
    start_step: int = 0,
    after_step: Callable[[int, int, list[StepLog]], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> list[StepLog]:
    """Run optimizer steps ``start_step + 1 ... cfg.steps``; rank 0 shows a progress bar.

    ``after_step(step, epoch, logs)`` runs once a step is applied (checkpoints go there).
    A non-finite loss raises :class:`NonFiniteLoss` *before* its update is applied; a
    stop request raises :class:`StopRequested` after the step it arrived in.
    """
    grad_sync = grad_sync or ddp_grad_sync(model, cfg.grad_accum_steps, never_sync=cfg.skip_grad_sync)
    logs: list[StepLog] = []
    with tqdm(total=cfg.steps, initial=start_step, disable=not ctx.is_main, unit="step", dynamic_ncols=True) as bar:
        for step, epoch, ids, (x, y) in epoch_batches(loader, cfg.steps, start_step):
            start = time.perf_counter()
            x, y = x.to(ctx.device), y.to(ctx.device)
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, x, y, loss_fn, cfg.grad_accum_steps, grad_sync)
            loss_value, stop = sync_step_stats(loss, stop_requested(), ctx)
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(step, loss_value)
            optimizer.step()
            rate = cfg.global_batch_size / (time.perf_counter() - start)
            logs.append(StepLog(step, loss_value, rate, gather_ids(ids, ctx) if cfg.record_samples else None))
            if after_step:
                after_step(step, epoch, logs)
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_per_s=f"{rate:,.0f}")
            bar.update()
            if stop:
                raise StopRequested(step)
    return logs
