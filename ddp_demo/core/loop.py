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
from ddp_demo.core.agree import Agreement
from ddp_demo.core.config import TrainConfig
from ddp_demo.core.data import Task
from ddp_demo.core.dist import DistContext
from ddp_demo.core.precision import Precision


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
    def __init__(self, step: int, value: float, before: str = "applying"):
        super().__init__(f"the loss is {value} at step {step}; stopped before {before} that step")
        self.step = step


class StopRequested(Exception):
    """A signal asked every rank to stop; raised on all ranks at the same step boundary."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a signal after step {step}")
        self.step = step


class Watch:
    """When the host reads the pair the ranks agreed on (core.agree), and what it checks.

    On the CPU it reads every step: the pair is already in host memory, so a read costs
    nothing, and a non-finite loss is refused before its update is applied. On CUDA a read
    waits for the GPU to finish the step (a host-device synchronisation that keeps the CPU
    from queueing the next step's work), so it reads only at the steps that need the
    values: logged steps (``--log-every``), checkpoints and the last step. In between, the
    device remembers the first step whose loss was not finite; the next read stops the run
    there, before any checkpoint or output holds that step.
    """

    def __init__(self, cfg: TrainConfig, deferred: bool):
        self.cfg, self.deferred = cfg, deferred  # deferred: read only when due (CUDA), else every step (CPU)
        self.first_bad: torch.Tensor | None = None  # [step, loss] of the first non-finite loss since the last read

    def due(self, step: int) -> bool:
        cfg = self.cfg
        return (not self.deferred or step % cfg.log_every == 0 or step == cfg.steps
                or (cfg.checkpoint_dir is not None and step % cfg.checkpoint_every == 0))

    def remember(self, step: int, agreed: torch.Tensor) -> None:
        """Device-side only (no read): keep the first non-finite loss and its step."""
        mark = torch.stack([torch.full_like(agreed[0], step), agreed[0]])
        if self.first_bad is None:
            self.first_bad = torch.zeros_like(mark)
        new = torch.isfinite(agreed[0]).logical_not() & (self.first_bad[0] == 0)
        self.first_bad = torch.where(new, mark, self.first_bad)

    def read(self, step: int, agreed: torch.Tensor) -> tuple[float, bool]:
        """The agreed (loss, stop); raises NonFiniteLoss naming the first bad step."""
        values = agreed.tolist() + ([] if self.first_bad is None else self.first_bad.tolist())
        loss, stop = values[0], values[1] > 0
        bad_step, bad_loss = (values[2], values[3]) if len(values) > 2 and values[2] else (step, loss)
        if not math.isfinite(bad_loss):
            raise NonFiniteLoss(int(bad_step), bad_loss, "saving" if self.deferred else "applying")
        self.first_bad = None
        return loss, stop


def gather_ids(ids: list[int], ctx: DistContext) -> list[list[int]]:
    """Every rank's sample ids for this step, by rank (test/record mode): kept apart so a
    check can see that the ranks' shares are disjoint, B / N each, and make up the batch."""
    if not dist.is_initialized():
        return [list(ids)]
    every: list = [None] * ctx.world_size
    dist.all_gather_object(every, list(ids))
    return every


class Rate:
    """Samples per second between two logged steps."""

    def __init__(self, cfg: TrainConfig, step: int):
        self.batch, self.step, self.time = cfg.global_batch_size, step, time.perf_counter()

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        rate = self.batch * (step - self.step) / (now - self.time)
        self.step, self.time = step, now
        return rate


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
    agreement: Agreement | None = None,
) -> list[StepLog]:
    """Run optimizer steps ``start_step + 1 ... cfg.steps``; rank 0 shows a progress bar.

    ``after_step(step, epoch, logs)`` runs once a step is applied (checkpoints go there).
    A non-finite loss raises :class:`NonFiniteLoss` before any checkpoint or output holds
    it (on the CPU: before its update is applied); a stop request raises
    :class:`StopRequested` after the step it was agreed on. ``agreement`` (made here if
    not given) carries the loss and stop flag in DDP's gradient all-reduce.
    """
    grad_sync = grad_sync or ddp_grad_sync(model, cfg.grad_accum_steps, never_sync=cfg.skip_grad_sync)
    agreement = agreement or Agreement(model, ctx)
    precision, rate = Precision(cfg.precision, ctx.device), Rate(cfg, start_step)
    watch = Watch(cfg, deferred=ctx.device.type != "cpu")
    logs: list[StepLog] = []
    shown = 0.0  # when the bar's loss and rate were last set
    with tqdm(total=cfg.steps, initial=start_step, disable=not ctx.is_main, unit="step", dynamic_ncols=True) as bar:
        for step, epoch, ids, (x, y) in epoch_batches(loader, cfg.steps, start_step):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            agreement.begin(stop_requested())
            accumulate_gradients(model, x, y, loss_fn, cfg.grad_accum_steps, grad_sync, precision, agreement.note)
            agreed, stop = agreement.result(), False
            if watch.due(step):
                loss, stop = watch.read(step, agreed)
            else:
                watch.remember(step, agreed)
            precision.step(optimizer)
            if step % cfg.log_every == 0 or step == cfg.steps:
                logs.append(StepLog(step, loss, rate(step), gather_ids(ids, ctx) if cfg.record_samples else None))
                if ctx.is_main and (time.perf_counter() - shown >= 0.1 or step == cfg.steps):
                    shown = time.perf_counter()  # the bar redraws at most every 0.1 s: no need to format more often
                    bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{logs[-1].samples_per_s:,.0f}", refresh=False)
            if after_step:
                after_step(step, epoch, logs)
            bar.update()
            if stop:
                raise StopRequested(step)
    return logs
