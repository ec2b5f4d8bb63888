"""The trainer's step against the loop a user would write, inside the benchmark's process group.

For the trainer's own jobs (``--model mlp`` and ``--model cnn``, global batch 64, SGD with
momentum) each repetition runs one epoch of ``core.loop.train_loop`` (progress bar, agreed
loss, logging: everything but start-up and the final checks) and one epoch of the minimal
DDP loop over the same data::

    for x, y in loader:                       # the same DistributedSampler, set_epoch(e)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()
        optimizer.step()

paired repetition by repetition, with the trainer's loader in both (it fetches a batch in
one indexing op, core/data.py); the same loop with the DataLoader a user would write
(per-sample fetch and ``torch.stack``) is timed beside them. Two more variants price two choices: the trainer agreeing
on its loss with an all-reduce of its own each step (what it did before issue 13, instead
of carrying the loss in DDP's gradient all-reduce, core/agree.py), and the trainer under
``--precision bf16``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

from torch.utils.data import DataLoader, TensorDataset

from ddp_demo import train
from ddp_demo.bench.timing import Reps, interleaved, progress, warm_up
from ddp_demo.core.agree import Agreement
from ddp_demo.core.config import TrainConfig
from ddp_demo.core.data import builtin_task, rank_loader
from ddp_demo.core.dist import DistContext
from ddp_demo.core.loop import LoopControl, Wrapped, loss_function, train_loop
from ddp_demo.core.models import make_optimizer

TRAINER_VARIANTS = {  # name -> (carry the loss in the gradient all-reduce?, precision)
    "trainer": (True, "fp32"),
    "trainer, own all-reduce": (False, "fp32"),
    "trainer, bf16": (True, "bf16"),
}


class Job:
    """One of the trainer's jobs, sized so that one epoch is ``steps`` steps."""

    def __init__(self, model: str, steps: int, ctx: DistContext):
        self.cfg = TrainConfig(model=model)
        self.task = builtin_task(model, self.cfg.seed, self.cfg.torch_dtype, n_train=steps * self.cfg.global_batch_size)
        self.ctx, self.loss_fn = ctx, loss_function(self.task)

    def parts(self):
        """A fresh model (the trainer's seed), wrapped in DDP, its optimizer and a loader."""
        model = train.make_model(self.cfg, self.task, self.ctx.device)
        optimizer = make_optimizer(self.cfg.optimizer, self.cfg.lr, model.parameters())
        loader = rank_loader(self.task.train, self.ctx, self.cfg.global_batch_size, self.cfg.seed)
        return train.ddp_wrap(model, self.ctx), optimizer, loader


class BareEpochs:
    """The minimal DDP loop, one epoch per call. ``plain_loader``: with the DataLoader a user
    would write (``TensorDataset``, ``batch_size``, the same DistributedSampler), which
    fetches sample by sample and stacks them; otherwise with the trainer's own loader."""

    def __init__(self, job: Job, plain_loader: bool = False):
        self.ddp, self.optimizer, self.loader = job.parts()
        if plain_loader:
            self.loader = DataLoader(TensorDataset(*self.loader.dataset.tensors), batch_size=self.loader.batch_size,
                                     sampler=self.loader.sampler, drop_last=True)
        self.loss_fn, self.epoch = job.loss_fn, 0

    def __call__(self) -> None:
        self.loader.sampler.set_epoch(self.epoch)
        for x, y in self.loader:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_fn(self.ddp(x), y).backward()
            self.optimizer.step()
        self.epoch += 1


class TrainerEpochs:
    """``train_loop``, one epoch per call, each call going on where the last one stopped."""

    def __init__(self, job: Job, carry: bool, precision: str, quiet):
        self.ddp, self.optimizer, self.loader = job.parts()
        self.job, self.quiet, self.step = job, quiet, 0
        self.cfg = replace(job.cfg, precision=precision)
        self.agreement = Agreement(self.ddp, job.ctx, carry=carry)

    def __call__(self) -> None:
        end = self.step + len(self.loader)
        with contextlib.redirect_stderr(self.quiet):  # rank 0's progress bar: drawn, not shown
            train_loop(Wrapped(self.ddp, self.optimizer, agreement=self.agreement), self.loader, self.job.loss_fn,
                       replace(self.cfg, steps=end), self.job.ctx, LoopControl(start_step=self.step))
        self.step = end


def trainer_on_rank(ctx: DistContext, models: list[str], steps: int, reps: int, queue) -> dict:
    """Seconds per step of the bare loop and each trainer variant, per model, interleaved, ``reps`` times."""
    r = Reps(warmup=1, reps=reps)  # one epoch each to warm up: buckets rebuilt, memory settled
    out = {}
    with open(os.devnull, "w") as quiet:
        for model in models:
            job = Job(model, steps, ctx)
            fns = {"bare loop": BareEpochs(job), "bare loop, plain DataLoader": BareEpochs(job, plain_loader=True)}
            fns |= {name: TrainerEpochs(job, *how, quiet) for name, how in TRAINER_VARIANTS.items()}
            warm_up(fns, r)
            times = interleaved(fns, {name: 1 for name in fns}, r, ctx)
            out[model] = {"steps_per_epoch": steps, "step_s": {k: [t / steps for t in v] for k, v in times.items()}}
            progress(queue, ctx, f"trainer vs bare loop: {model}")
    return out
