"""The runs compared: the user's training step on N processes, and in one process.

:func:`run_worlds` starts max(N) gloo processes once (``core.spawn.run_on_ranks``: a FileStore,
no ports, a timeout) and runs every N on them, largest first, re-forming the group for each
smaller N (:func:`regroup`). Every rank loads the target by its name, takes samples r, r+N, ...
of the global batch (DistributedSampler's layout), wraps the model (DDP, zero or fsdp) and runs
the recipe's steps on that share (``recipe.py``), recording what each step did (``trace.py``).
It returns every parameter's gradient as the first optimizer step sees it, and every parameter
and floating buffer after the last step. :func:`reference` does the same in this process on the
whole batch, in one micro-batch.

Parameters that get no gradient on some rank make plain ``DDP(model)`` raise ("Expected to
have finished reduction in the prior iteration") or hang. So that the check itself never hangs,
each rank first runs one backward on a copy of the model and the ranks share which parameters
got nothing; if any did, DDP is built with ``find_unused_parameters=True`` and the check reports
those parameters (``diagnose.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.check.recipe import OneProcess, Recipe, Sharded, check_step, micro_batches
from ddp_demo.check.stalled import others_wait, quiet, where_stopped
from ddp_demo.check.target import CheckError, Target, call_target
from ddp_demo.check.trace import Progress, Recorder, install
from ddp_demo.core.config import PROOF_LR
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import make_optimizer
from ddp_demo.core.spawn import WorkerError, run_on_ranks


@dataclass(frozen=True)
class Plan:
    """How every process trains the target (it travels to the workers, so plain values only)."""

    spec: str
    dtype: str = "float64"
    optimizer: str = "sgd"
    lr: float | None = None  # None: the proofs' rate for the optimizer (core/config.py, PROOF_LR)
    steps: int = 3
    find_unused_parameters: bool = False
    strategy: str = "ddp"  # ddp, zero or fsdp (ddp_demo/parallel/strategy.py)
    reduce_dtype: str | None = None  # fsdp: reduce-scatter gradients in this lower dtype (check/reduce_dtype.py)

    @property
    def learning_rate(self) -> float:
        return PROOF_LR[self.optimizer] if self.lr is None else self.lr


@dataclass
class Trained:
    """What one process holds after training: the compared tensors."""

    grads: dict[str, torch.Tensor | None]  # .grad as the first optimizer step sees it (None: no gradient)
    after: dict[str, torch.Tensor]  # parameters and floating buffers after the last step
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # the largest learning rate at each optimizer step
    adam_eps: float | None = None  # an optimizer of Adam's family: its eps (verdict.adam_allowance)
    optimizer_name: str = ""
    trace: list[dict] = field(default_factory=list)  # what each step did, on a rank (trace.Recorder)


@dataclass
class Watch:
    """What a rank records while it trains (trace.py)."""

    progress: Progress
    local_grads: bool  # keep local gradients to see them edited (ddp and zero: fsdp's are sharded)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating buffers (running statistics); integer counters are not compared."""
    state = {n: whole(p.detach()).clone() for n, p in model.named_parameters()}
    return state | {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}


def whole(t: torch.Tensor) -> torch.Tensor:
    """fsdp's parameters and gradients are DTensor shards: every rank gathers the full tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_factory(plan: Plan, recipe: Recipe) -> Callable[[Iterable], torch.optim.Optimizer]:
    """The recipe's optimizer, else ``--optimizer`` at ``--lr``; it gets a list (it may look twice)."""
    make = recipe.optimizer or (lambda params: make_optimizer(plan.optimizer, plan.learning_rate, params))
    return lambda params: make(list(params))


def steps_of(plan: Plan, recipe: Recipe) -> int:
    return recipe.steps or plan.steps


def train(model: torch.nn.Module, part: Target, plan: Plan, opt: torch.optim.Optimizer, k: int,
          watch: Watch | None = None) -> Trained:
    """The recipe's steps on ``part``, ``model`` the wrapped Module (``k`` micro-batches per step): the
    gradients the optimizer's first step sees, and every value after the last step. ``watch``: record
    what each step did (trace.py)."""
    recipe, module = part.recipe, part.model
    grads: dict = {}
    lrs: list[float] = []

    def seen(optimizer, args, kwargs):  # a step pre-hook: the gradients as the optimizer receives them
        lrs.append(max(g["lr"] for g in optimizer.param_groups))
        if len(lrs) == 1:
            grads.update({n: None if p.grad is None else whole(p.grad.detach()).clone()
                          for n, p in module.named_parameters() if p.requires_grad})

    handle = opt.register_step_pre_hook(seen)
    scheduler = recipe.scheduler(opt) if recipe.scheduler else None
    step = recipe.step or check_step(recipe)
    batch = (*part.inputs, part.target)
    given = micro_batches(batch, k) if recipe.accumulate > 1 else batch
    losses = []
    recorder = Recorder(model, module, opt, watch.progress, watch.local_grads) if watch else contextlib.nullcontext()
    with recorder:
        for i in range(steps_of(plan, recipe)):
            if watch:
                recorder.begin(i)
            loss = step(model, given, opt)
            losses.append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss) if loss is not None else 0.0)
            if watch:
                recorder.end()
            if scheduler is not None:
                scheduler.step()
    handle.remove()
    eps = opt.defaults.get("eps") if "betas" in opt.defaults else None  # Adam's family (verdict.adam_allowance)
    trace = recorder.steps if watch else []
    return Trained(grads, snapshot(module), losses, lrs, eps, type(opt).__name__, trace)


def _check_loss(spec: str, part: Target) -> None:
    if part.loss_fn is None:  # the recipe's own step computes the loss
        return
    loss = part.loss_fn(part.model(*part.inputs), part.target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise CheckError(f"TARGET {spec}: loss_fn must return a scalar tensor that depends on the model "
                          f"(e.g. a mean over the batch); it returned {what}")


def reference(plan: Plan) -> Trained:
    """One process on the whole batch. A loss that is not a finite scalar is bad input."""
    _check_loss(plan.spec, call_target(plan.spec, plan.dtype))
    part = call_target(plan.spec, plan.dtype)  # a fresh build: the probe above ran a forward
    make = optimizer_factory(plan, part.recipe)
    result = train(OneProcess(part.model), part, plan, make(part.model.parameters()), k=1)
    bad = [i for i, loss in enumerate(result.losses, 1) if not math.isfinite(loss)]  # 0.0: step returned nothing
    if bad:
        raise CheckError(f"TARGET {plan.spec}: the loss is {result.losses[bad[0] - 1]} at step {bad[0]} in one "
                          "process; lower --lr or --steps, or fix the model")
    return result


def unused_parameters(part: Target) -> list[str]:
    """Trainable parameters that get no gradient from one backward on ``part``: a copy of the
    model runs it, with the random-number state restored afterwards, so nothing else changes."""
    if part.loss_fn is None:
        return []  # the recipe's own step: nothing to probe with (a hang is stopped at --timeout)
    model = copy.deepcopy(part.model)
    with torch.random.fork_rng(devices=[]):
        part.loss_fn(model(*part.inputs), part.target).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def train_on_rank(ctx: DistContext, plan: Plan, progress: Progress) -> dict:
    """This rank's share through DDP; the compared tensors and the parameters each rank left unused."""
    part = call_target(plan.spec, plan.dtype).shard(ctx.rank, ctx.world_size)
    unused: list = [None] * ctx.world_size
    dist.all_gather_object(unused, unused_parameters(part))
    find_unused = plan.find_unused_parameters or any(unused)
    make, k = optimizer_factory(plan, part.recipe), part.recipe.accumulate
    if plan.strategy == "ddp":
        model = DDP(part.model, find_unused_parameters=find_unused)
        trained = train(model, part, plan, make(model.parameters()), k, Watch(progress, True))
        return {"grads": trained.grads, "after": trained.after, "unused": unused, "find_unused": find_unused,
                "lrs": trained.lrs, "trace": trained.trace}
    from ddp_demo.parallel import holdings, strategy  # FSDP's imports cost a second: only when asked

    w = strategy.wrap(part.model, ctx, strategy.StrategyConfig(plan.strategy, reduce_dtype=plan.reduce_dtype), make)
    model = Sharded(w.model, w.set_grad_sync) if plan.strategy == "fsdp" else w.model
    trained = train(model, part, plan, w.optimizer, k, Watch(progress, plan.strategy == "zero"))
    return {"grads": trained.grads, "after": trained.after, "unused": unused, "find_unused": find_unused,
            "lrs": trained.lrs, "trace": trained.trace,
            "buffers_per_rank": holdings.buffers_differing(part.model, ctx)}


def run_plans(ctx: DistContext, plans: list[Plan], progress: Progress) -> list[dict]:
    """Every target at one world size (start-up costs seconds, a target milliseconds).

    A target that raises is reported, and the next one runs: an error every rank meets at the
    same point (a shape the model cannot take, say) leaves no collective half-done. One that
    stops some ranks only is stopped by the parent (``stalled.others_wait``, or the timeout).
    """
    out = []
    for plan in plans:
        progress.note("loading the target", target=f"{plan.spec} ({plan.strategy})", step=0, raised=None,
                      world=ctx.world_size)
        try:
            out.append(train_on_rank(ctx, plan, progress))
            progress.note("finished the target")
        except Exception as e:
            progress.note(raised=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                          raised_at=time.time(), raised_in=f"{ctx.world_size} {plan.spec} {plan.strategy}",
                          world_raised=ctx.world_size)
            out.append({"error": traceback.format_exc(), "where": dict(progress.state)})
    return out


def regroup(ctx: DistContext, n: int, folder: str, timeout: float) -> DistContext | None:
    """The first ``n`` of these processes as a process group of their own (None: this rank sits out).
    The largest N runs first on the group the processes started with; each smaller N re-forms it
    on a FileStore of its own, so one start-up serves every N."""
    if n == dist.get_world_size():
        return ctx
    gc.collect()  # DDP models freed before their group goes (core/dist.py, teardown)
    dist.destroy_process_group()
    if ctx.rank >= n:
        return None
    store = dist.FileStore(os.path.join(folder, f"store{n}"), n)
    dist.init_process_group("gloo", rank=ctx.rank, world_size=n, store=store, timeout=timedelta(seconds=timeout))
    return dataclasses.replace(ctx, world_size=n)


def check_on_rank(ctx: DistContext, plans: list[Plan], folder: str, sizes: list[int], timeout: float) -> dict:
    """Every target at every world size in ``sizes`` (largest first): ``{N: [result per plan], "ends": {N: time}}``.
    ``folder`` receives where each rank is (trace.Progress) and its stderr (stalled.quiet)."""
    install()
    quiet(folder, ctx.rank)
    progress, out = Progress(folder, ctx.rank), {"ends": {}}
    for n in sorted(sizes, reverse=True):
        sub = regroup(ctx, n, folder, timeout)
        if sub is None:
            break
        out[n] = run_plans(sub, plans, progress)
        out["ends"][n] = time.time()
    return out


def preloaded(plans: list[Plan]) -> tuple[str, ...]:
    """What the ranks' fork server imports once: this module, and FSDP's and ZeRO's only when asked."""
    sharded = ("ddp_demo.parallel.strategy", "ddp_demo.parallel.holdings")
    return ("ddp_demo.check.engine", *(sharded if any(p.strategy != "ddp" for p in plans) else ()))


def run_worlds(sizes: tuple[int, ...], plans: list[Plan], timeout: float) -> dict[int, tuple[list[list[dict]], float]]:
    """``{N: ([[rank 0's result, rank 1's, ...] for each plan], seconds)}`` from one set of max(N)
    processes; the largest N's seconds include starting them. Raises ``WorkerError`` whose first
    line (stalled.py) names the rank that stopped the check, its step and the last thing it did."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="ddp-demo-check-") as folder:
        try:
            per_rank = run_on_ranks(check_on_rank, max(sizes), (plans, folder, list(sizes), timeout),
                                    timeout=timeout, give_up=lambda: others_wait(folder, max(sizes)),
                                    preload=preloaded(plans))
        except WorkerError as e:
            timed_out = time.time() - start >= timeout
            raise WorkerError(where_stopped(folder, max(sizes), timeout if timed_out else None, str(e))) from None
    ends, out, before = per_rank[0]["ends"], {}, start
    for n in sorted(sizes, reverse=True):
        out[n] = ([[per_rank[r][n][i] for r in range(n)] for i in range(len(plans))], ends[n] - before)
        before = ends[n]
    return out
