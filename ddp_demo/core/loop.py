"""The training step and loop shared by every launcher.

Nothing here knows how processes were started: the caller passes what its launcher
wrapped (:class:`Wrapped`: the model, already in ``DistributedDataParallel`` under
torchrun, its optimizer and, if needed, its own :class:`~ddp_demo.core.accumulate.GradSync`,
how a micro-batch syncs its gradients). Read :func:`train_loop` beside examples/ddp.py:
for each batch, one :class:`TrainStep` (zero_grad, forward and backward, step), then
:class:`StepLogger` records it. The rest is what a run needs around that: agreeing on the
loss and a stop request (core/agree.py), checkpoints and signals (``LoopControl``).
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


@dataclass(frozen=True)
class Wrapped:
    """What a launcher wrapped (train.py's ``wrap``): the loop trains with these."""

    model: torch.nn.Module  # DDP(model), Accelerate's prepared model, or the bare model (plain python)
    optimizer: torch.optim.Optimizer  # the optimizer of the bare model (or Accelerate's prepared one)
    grad_sync: GradSync | None = None  # how each micro-batch syncs; None: DDP's no_sync (ddp_grad_sync)
    agreement: Agreement | None = None  # carries loss and stop flag in the gradient all-reduce; None: made here
    # Rank 0's whole state_dict, keys without prefixes (final.pt), and the flat tensor every rank must
    # agree on after training; None: read from the model itself (bare or DDP, every rank holds it whole)
    full_state: Callable[[], dict | None] | None = None
    agreed_tensor: Callable[[], torch.Tensor] | None = None


@dataclass(frozen=True)
class LoopControl:
    """Where the loop starts and what it consults around each step."""

    start_step: int = 0  # the last step already applied (a resumed run): train start_step + 1 ... cfg.steps
    after_step: Callable[[int, int, list[StepLog]], None] | None = None  # (step, epoch, logs): checkpoints, faults
    stop_requested: Callable[[], bool] = lambda: False  # True once this rank was asked to stop (a signal)


class TrainStep:
    """One optimizer step: zero_grad, forward and backward over K micro-batches, agree, apply.

    The agreed loss is read (and checked: a non-finite one raises :class:`NonFiniteLoss`)
    before the update is applied, where :class:`Watch` says a read is due.
    """

    def __init__(self, wrapped: Wrapped, loss_fn: Callable, cfg: TrainConfig, ctx: DistContext):
        self.model, self.optimizer, self.loss_fn = wrapped.model, wrapped.optimizer, loss_fn
        self.k, self.device = cfg.grad_accum_steps, ctx.device
        self.grad_sync = wrapped.grad_sync or ddp_grad_sync(self.model, self.k, never_sync=cfg.skip_grad_sync)
        self.agreement = wrapped.agreement or Agreement(self.model, ctx)
        self.precision = Precision(cfg.precision, ctx.device)
        self.watch = Watch(cfg, deferred=ctx.device.type != "cpu")

    def __call__(self, step: int, batch: tuple[torch.Tensor, torch.Tensor], stop: bool) -> tuple[float | None, bool]:
        """Train on ``batch``; ``stop``: this rank was asked to stop. Returns the agreed (loss,
        stop), or (None, False) where no read was due (the loss stays on the device)."""
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.agreement.begin(stop)
        accumulate_gradients(self.model, x, y, self.loss_fn, self.k, self.grad_sync, self.precision,
                             self.agreement.note)
        agreed, loss, stop = self.agreement.result(), None, False
        if self.watch.due(step):
            loss, stop = self.watch.read(step, agreed)
        else:
            self.watch.remember(step, agreed)
        self.precision.step(self.optimizer)
        return loss, stop


class StepLogger:
    """Keeps a :class:`StepLog` every ``--log-every`` steps and at the last; rank 0's
    progress bar shows the latest loss and rate."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, start_step: int):
        self.cfg, self.ctx, self.rate = cfg, ctx, Rate(cfg, start_step)
        self.logs: list[StepLog] = []
        self.shown = 0.0  # when the bar's loss and rate were last set

    def __call__(self, step: int, loss: float | None, ids: list[int], bar: tqdm) -> None:
        cfg, ctx = self.cfg, self.ctx
        if not (step % cfg.log_every == 0 or step == cfg.steps):
            return
        self.logs.append(StepLog(step, loss, self.rate(step), gather_ids(ids, ctx) if cfg.record_samples else None))
        if ctx.is_main and (time.perf_counter() - self.shown >= 0.1 or step == cfg.steps):
            self.shown = time.perf_counter()  # the bar redraws at most every 0.1 s: no need to format more often
            bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{self.logs[-1].samples_per_s:,.0f}", refresh=False)


def train_loop(wrapped: Wrapped, loader: DataLoader, loss_fn: Callable, cfg: TrainConfig, ctx: DistContext,
               control: LoopControl = LoopControl()) -> list[StepLog]:
    """Run optimizer steps ``control.start_step + 1 ... cfg.steps``; rank 0 shows a progress bar.

    ``control.after_step(step, epoch, logs)`` runs once a step is applied (checkpoints go
    there). A non-finite loss raises :class:`NonFiniteLoss` before any checkpoint or output
    holds it (on the CPU: before its update is applied); a stop request raises
    :class:`StopRequested` after the step it was agreed on.
    """
    train_step, log_step = TrainStep(wrapped, loss_fn, cfg, ctx), StepLogger(cfg, ctx, control.start_step)
    bar = tqdm(total=cfg.steps, initial=control.start_step, disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    with bar:
        for step, epoch, ids, batch in epoch_batches(loader, cfg.steps, control.start_step):
            loss, stop = train_step(step, batch, control.stop_requested())
            log_step(step, loss, ids, bar)
            if control.after_step:
                control.after_step(step, epoch, log_step.logs)
            bar.update()
            if stop:
                raise StopRequested(step)
    return log_step.logs
