"""What the trainer trains with under each ``--strategy``, and what its ranks compare at the end.

``strategy_wrap`` turns a ``TrainConfig`` into a ``StrategyConfig`` and wraps the Module
(``parallel/strategy.py``) into the loop's ``Wrapped`` (core/loop.py): the model, the optimizer,
how gradients sync over accumulated micro-batches, the full state dict ``final.pt`` holds, and
the tensor whose equality across ranks the trainer checks after training (``flat_parameters``;
under fsdp, ``gathered``). Used by ``ddp_demo.train``'s launcher and by the proof's trainer rows.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ddp_demo.core.config import TrainConfig
from ddp_demo.core.dist import DistContext
from ddp_demo.core.loop import Wrapped
from ddp_demo.core.models import make_optimizer
from ddp_demo.parallel import strategy
from ddp_demo.parallel.strategy import StrategyConfig


def strategy_wrap(model: torch.nn.Module, optimizer, cfg: TrainConfig, ctx: DistContext) -> Wrapped:
    """``--strategy``: ddp and zero wrap in DDP (``--ddp``: torch's or ScratchDDP), zero shards the
    optimizer state, fsdp shards everything (``--ddp``: fully_shard or ScratchFSDP;
    ddp_demo/parallel/strategy.py)."""
    scfg = StrategyConfig(cfg.strategy, cfg.ddp, cfg.precision, reduce_grads=not cfg.skip_grad_sync)
    # ``optimizer`` was built on the Module's parameters (and holds a resumed state): ddp keeps it and
    # zero takes it as its template. fully_shard replaces the parameters by shards, so fsdp builds anew.
    fresh = lambda params: make_optimizer(cfg.optimizer, cfg.lr, params)  # noqa: E731
    w = strategy.wrap(model, ctx, scfg, fresh if cfg.strategy == "fsdp" else lambda params: optimizer)
    if w.strategy != "fsdp" or not ctx.distributed:  # DDP's no_sync (and --skip-grad-sync) as before
        return Wrapped(w.model, w.optimizer)
    return Wrapped(w.model, w.optimizer, w.grad_sync(cfg.grad_accum_steps),
                   full_state=lambda: strategy.full_state_dict(w, ctx), agreed_tensor=lambda: gathered(w))


def sharded_by(model: torch.nn.Module, cfg: TrainConfig, ctx: DistContext) -> str:
    """What the run's first line says shards an fsdp run, read from the wrapped model, not from
    ``--ddp``: what ran, not what was asked. Empty for ddp, zero and one process."""
    if cfg.strategy != "fsdp" or not ctx.distributed:
        return ""
    return "sharded by fully_shard, " if isinstance(model, FSDPModule) else "sharded by ddp_demo's ScratchFSDP, "


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def gathered(w: strategy.Wrapped) -> torch.Tensor:
    """fsdp: what each rank gathers of the whole model, parameters and buffers. The shards are one
    copy, so they agree by construction; what can drift apart is what each rank keeps whole: the
    0-dim parameters (strategy.Replicas) and the buffers, which FSDP2 never syncs (BatchNorm's
    running statistics, pytorch/torchtitan#670). ScratchFSDP (--ddp scratch) gathers its own."""
    with w.sharding.summoned() if w.sharding else contextlib.nullcontext():
        whole = [p.full_tensor() if isinstance(p, DTensor) else p for p in w.module.parameters()]
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in [*whole, *w.module.buffers()]])
