"""Checks for core/agree.py: the loss and stop flag ride in DDP's gradient all-reduce.

Run on N ranks by ``core.spawn.run_on_ranks`` (tests/test_agree.py). Every all-reduce is
counted by wrapping ``ProcessGroup.allreduce``, where ``dist.all_reduce`` ends too; DDP's
buckets are made visible to the count by a hook that is torch's own ``allreduce_hook``. Three loops train
the same steps:

- the bare DDP loop (zero_grad, forward, loss, backward, step): its count is the baseline
  (and, run again without the counted hook, its gradients are DDP's own);
- the trainer's ``train_loop``: must make exactly as many collectives, leave bit-identical
  gradients and log the mean of the ranks' losses;
- the trainer agreeing with an all-reduce of its own (``carry=False``): the negative
  control, which must count one more per step, or the count proves nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.agree import Agreement
from ddp_demo.core.config import TrainConfig
from ddp_demo.core.data import builtin_task, rank_loader
from ddp_demo.core.dist import DistContext
from ddp_demo.core.loop import LoopControl, StopRequested, Wrapped, loss_function, train_loop
from ddp_demo.core.models import build_model, make_optimizer
from ddp_demo.parallel.ddp import ScratchDDP

STEPS = 4
CFG = TrainConfig(model="mlp", steps=STEPS, global_batch_size=16, dtype="float64")


@contextlib.contextmanager
def counting_all_reduce(calls: list[int]) -> Iterator[None]:
    """Append the element count of every all-reduce a process group starts inside the block:
    ``dist.all_reduce`` and direct ``ProcessGroup.allreduce`` calls (core/agree.py's hook
    makes those) both end in that method."""
    group_class = dist.ProcessGroup
    real = group_class.__dict__["allreduce"]  # the descriptor itself, so that it can be put back as it was

    def counted(self, tensors, *args, **kwargs):
        calls.append(sum(t.numel() for t in tensors) if isinstance(tensors, list | tuple) else tensors.numel())
        return real.__get__(self)(tensors, *args, **kwargs)

    group_class.allreduce = counted
    try:
        yield
    finally:
        group_class.allreduce = real


def parts(ctx: DistContext, cfg: TrainConfig = CFG, scratch: bool = False):
    """The same model, optimizer and data on every call, in torch's DDP or (``scratch``)
    ddp_demo's ScratchDDP. ``bucket_cap_mb`` is tiny so that there are several buckets and
    only bucket 0 may carry the pair."""
    task = builtin_task(cfg.model, cfg.seed, cfg.torch_dtype, n_train=cfg.global_batch_size * STEPS, n_heldout=0)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, task.x_shape, task.num_classes).to(cfg.torch_dtype)
    cap = 0.0005  # MB: a few hundred bytes per bucket
    ddp = ScratchDDP(model, bucket_cap_mb=cap, first_bucket_cap_mb=cap) if scratch else DDP(model, bucket_cap_mb=cap)
    loader = rank_loader(task.train, ctx, cfg.global_batch_size, cfg.seed)
    return ddp, make_optimizer(cfg.optimizer, cfg.lr, model.parameters()), loader, loss_function(task)


def grads(ddp) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()])


def bare_loop(ctx: DistContext, counted: bool = True, scratch: bool = False) -> dict:
    ddp, optimizer, loader, loss_fn = parts(ctx, scratch=scratch)
    if counted and not scratch:  # ScratchDDP's all-reduces are made in Python: counted as they are
        ddp.register_comm_hook(None, allreduce_hook)  # torch's default, in Python: countable
    calls: list[int] = []
    losses = []
    loader.sampler.set_epoch(0)
    with counting_all_reduce(calls):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return {"calls": calls, "grads": grads(ddp), "local_losses": losses}


def trainer(ctx: DistContext, carry: bool, scratch: bool = False) -> dict:
    ddp, optimizer, loader, loss_fn = parts(ctx, scratch=scratch)
    if not carry and not scratch:
        ddp.register_comm_hook(None, allreduce_hook)  # the buckets counted as in bare_loop
    agreement = Agreement(ddp, ctx, carry=carry)
    calls: list[int] = []
    with counting_all_reduce(calls):
        logs = train_loop(Wrapped(ddp, optimizer, agreement=agreement), loader, loss_fn, CFG, ctx)
    return {"calls": calls, "grads": grads(ddp), "logged": [entry.loss for entry in logs]}


def stop_on_one_rank(ctx: DistContext, rank: int = 1, at: int = 2) -> int | None:
    """Only ``rank`` is asked to stop, from step ``at`` on: every rank must stop after that step."""
    ddp, optimizer, loader, loss_fn = parts(ctx)
    asked = iter(range(1, 10**6))
    try:
        train_loop(Wrapped(ddp, optimizer), loader, loss_fn, replace(CFG, steps=10**6), ctx,
                   LoopControl(stop_requested=lambda: ctx.rank == rank and next(asked) >= at))
    except StopRequested as e:
        return e.step
    return None


def agreement_on_rank(ctx: DistContext) -> dict:
    return {"bare": bare_loop(ctx), "bare, DDP's C++ hook": bare_loop(ctx, counted=False),
            "trainer": trainer(ctx, carry=True), "control": trainer(ctx, carry=False),
            "stopped_at": stop_on_one_rank(ctx),
            "scratch": {"bare": bare_loop(ctx, scratch=True), "trainer": trainer(ctx, carry=True, scratch=True),
                        "control": trainer(ctx, carry=False, scratch=True)}}
