"""The equivalence checks: DDP on N ranks against one process on the whole batch.

Each ``*_on_rank`` function runs inside one worker (see ``core.spawn.run_on_ranks``) and
returns what that rank ended up with; the matching ``reference_*`` function computes
what a single process gets from the same seed and the same global batch. The tests
compare the two. ``sync=False`` runs backward under ``DDP.no_sync()``: gradients stay
local, which is the negative control showing that the comparison can fail.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo import train
from ddp_demo.core.accumulate import GradSync, accumulate_gradients, ddp_grad_sync
from ddp_demo.core.config import DTYPES, PROOF_LR, TrainConfig
from ddp_demo.core.data import builtin_task, rank_loader
from ddp_demo.core.dist import DistContext
from ddp_demo.core.loop import loss_function, train_loop
from ddp_demo.core.models import build_model, make_optimizer

SEED = 1234
GLOBAL_BATCH = 24  # divisible by every world size tested: 1, 2, 3, 4
LR = PROOF_LR
Wrap = Callable[[torch.nn.Module], torch.nn.Module]  # DDP, or another wrapper to run the same case under


def case_setup(model_name: str, dtype: str, steps: int):
    """The same initial Module and the same ``steps`` global batches, in any process."""
    task = builtin_task(model_name, SEED, DTYPES[dtype], n_train=GLOBAL_BATCH * steps, n_heldout=0)
    torch.manual_seed(SEED)
    model = build_model(model_name, task.x_shape, task.num_classes).to(DTYPES[dtype])
    x, y = task.train.tensors
    batches = [(x[t * GLOBAL_BATCH : (t + 1) * GLOBAL_BATCH], y[t * GLOBAL_BATCH : (t + 1) * GLOBAL_BATCH])
               for t in range(steps)]
    return model, batches, loss_function(task)


def shard(batch, ctx: DistContext):
    """Rank r's part of a global batch: samples r, r+N, ... (DistributedSampler's layout)."""
    return [t[ctx.rank :: ctx.world_size] for t in batch]


def case_optimizer(name: str, params) -> torch.optim.Optimizer:
    """The optimizer every case uses: the trainer's, at the case's learning rate."""
    return make_optimizer(name, LR[name], params)


def grads_on_rank(ctx: DistContext, model_name: str, dtype: str, sync: bool = True,
                  wrap: Wrap = DDP) -> dict[str, torch.Tensor]:
    """One forward/backward of this rank's shard through DDP (or ``wrap``); the resulting .grad tensors."""
    model, (batch,), loss_fn = case_setup(model_name, dtype, steps=1)
    ddp = wrap(model)
    x, y = shard(batch, ctx)
    with contextlib.nullcontext() if sync else ddp.no_sync():
        loss_fn(ddp(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def reference_grads(model_name: str, dtype: str) -> dict[str, torch.Tensor]:
    model, (batch,), loss_fn = case_setup(model_name, dtype, steps=1)
    x, y = batch
    loss_fn(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def params_on_rank(ctx: DistContext, model_name: str, dtype: str, optimizer: str, steps: int = 5,
                   sync: bool = True, wrap: Wrap = DDP) -> dict[str, torch.Tensor]:
    """``steps`` optimizer steps through DDP (or ``wrap``); the parameters afterwards."""
    model, batches, loss_fn = case_setup(model_name, dtype, steps)
    ddp = wrap(model)
    opt = case_optimizer(optimizer, ddp.parameters())
    for batch in batches:
        x, y = shard(batch, ctx)
        opt.zero_grad()
        with contextlib.nullcontext() if sync else ddp.no_sync():
            loss_fn(ddp(x), y).backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_params(model_name: str, dtype: str, optimizer: str, steps: int = 5) -> dict[str, torch.Tensor]:
    model, batches, loss_fn = case_setup(model_name, dtype, steps)
    opt = case_optimizer(optimizer, model.parameters())
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trainer_params_on_rank(ctx: DistContext, model_name: str, dtype: str, optimizer: str, steps: int = 5,
                           sync: bool = True) -> dict[str, torch.Tensor]:
    """``steps`` optimizer steps through the trainer's own code: its model and optimizer,
    its loader (``rank_loader``: this rank's B / N samples of each shuffled global batch),
    the torchrun launcher's wrap (``DDP(model)``) and ``train_loop``. ``sync=False`` is
    ``--skip-grad-sync``. On a context of one process with no process group this is the
    single-process reference: the same code with nothing to wrap and nothing to average."""
    cfg = TrainConfig(model=model_name, dtype=dtype, optimizer=optimizer, lr=LR[optimizer], steps=steps,
                      global_batch_size=GLOBAL_BATCH, seed=SEED, skip_grad_sync=not sync)
    task = builtin_task(model_name, SEED, DTYPES[dtype], n_train=GLOBAL_BATCH * steps, n_heldout=0)
    model = train.make_model(cfg, task, ctx.device)
    wrapped = train.ProcessGroupLauncher().wrap(model, make_optimizer(optimizer, cfg.lr, model.parameters()), cfg, ctx)
    loader = rank_loader(task.train, ctx, cfg.global_batch_size, cfg.seed)
    with contextlib.redirect_stderr(io.StringIO()):  # rank 0's progress bar
        train_loop(wrapped, loader, loss_function(task), cfg, ctx)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def recording(sync: GradSync, model: torch.nn.Module, snapshots: list) -> GradSync:
    """``sync``, plus a copy of every ``.grad`` after each micro-batch's backward."""

    @contextlib.contextmanager
    def context(is_last: bool) -> Iterator[None]:
        with sync.context(is_last):
            yield
        snapshots.append(grads_of(model))

    return GradSync(context, sync.backward)


def micro_grads_on_rank(ctx: DistContext, model_name: str, dtype: str, k: int) -> list[dict[str, torch.Tensor]]:
    """One step accumulated over ``k`` micro-batches of this rank's shard, as ``train_loop``
    does it under torchrun; ``.grad`` after each micro-batch. The last must equal
    ``reference_grads``; the first ``k - 1`` ran under ``no_sync``, so they are this rank's
    own partial sums and must differ between ranks (the negative control)."""
    model, (batch,), loss_fn = case_setup(model_name, dtype, steps=1)
    ddp = DDP(model)
    snapshots: list = []
    accumulate_gradients(ddp, *shard(batch, ctx), loss_fn, k, recording(ddp_grad_sync(ddp, k), model, snapshots))
    return snapshots


class Case(NamedTuple):
    """One equivalence case: what runs, on which model and dtype, and whether gradients sync."""

    kind: str  # "grads": one backward; "params": 5 steps by hand; "trainer": 5 steps through the trainer
    model: str
    dtype: str
    synced: bool = True  # False: the negative control (DDP.no_sync, or --skip-grad-sync)
    optimizer: str | None = None  # "params" and "trainer" only


class AccumCase(NamedTuple):
    """One step accumulated over ``k`` micro-batches (:func:`micro_grads_on_rank`)."""

    model: str
    dtype: str
    k: int


def accum_cases_on_rank(ctx: DistContext, cases: list[AccumCase]) -> dict[AccumCase, list]:
    """Many accumulation cases in one set of processes."""
    return {case: micro_grads_on_rank(ctx, case.model, case.dtype, case.k) for case in cases}


def run_case(ctx: DistContext, case: Case) -> dict[str, torch.Tensor]:
    if case.kind == "grads":
        return grads_on_rank(ctx, case.model, case.dtype, sync=case.synced)
    steps = {"params": params_on_rank, "trainer": trainer_params_on_rank}[case.kind]
    return steps(ctx, case.model, case.dtype, case.optimizer, sync=case.synced)


def all_cases_on_rank(ctx: DistContext, cases: list[Case]) -> dict[Case, dict[str, torch.Tensor]]:
    """Run many cases in one set of processes (start-up costs seconds; a case, milliseconds)."""
    return {case: run_case(ctx, case) for case in cases}
