"""The runs compared: the user's model under DDP on N processes, and in one process.

For each world size N, :func:`run_world` starts N gloo processes (``core.spawn.run_on_ranks``:
a FileStore, no ports, a timeout). Every rank loads the target by its name, takes samples
r, r+N, ... of the global batch (DistributedSampler's layout), wraps the model in real
``DistributedDataParallel`` and trains ``--steps`` steps on that same batch. It returns every
parameter's gradient after the first backward, and every parameter and floating buffer after
the last step. :func:`reference` does the same in this process on the whole batch.

Parameters that get no gradient on some rank make plain ``DDP(model)`` raise ("Expected to
have finished reduction in the prior iteration") or hang. So that the check itself never hangs,
each rank first runs one backward on a copy of the model and the ranks share which parameters
got nothing; if any did, DDP is built with ``find_unused_parameters=True`` and the check reports
those parameters (``diagnose.py``).
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.check.target import CheckError, Target, call_target
from ddp_demo.core.config import PROOF_LR
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import make_optimizer
from ddp_demo.core.spawn import run_on_ranks


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

    grads: dict[str, torch.Tensor | None]  # .grad after the first backward (None: no gradient)
    after: dict[str, torch.Tensor]  # parameters and floating buffers after the last step
    losses: list[float] = field(default_factory=list)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating buffers (running statistics); integer counters are not compared."""
    state = {n: whole(p.detach()).clone() for n, p in model.named_parameters()}
    return state | {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}


def whole(t: torch.Tensor) -> torch.Tensor:
    """fsdp's parameters and gradients are DTensor shards: every rank gathers the full tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(forward, part: Target, plan: Plan, opt: torch.optim.Optimizer | None = None) -> Trained:
    """``plan.steps`` optimizer steps of ``forward`` (the model, or a strategy around it) on ``part``."""
    model = part.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or make_optimizer(plan.optimizer, plan.learning_rate, params)
    grads, losses = {}, []
    for step in range(plan.steps):
        opt.zero_grad(set_to_none=True)
        loss = part.loss_fn(forward(*part.inputs), part.target)
        loss.backward()
        losses.append(float(loss.detach()))
        if step == 0:
            grads = {n: None if p.grad is None else whole(p.grad.detach()).clone()
                     for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    return Trained(grads, snapshot(model), losses)


def _check_loss(spec: str, part: Target) -> None:
    loss = part.loss_fn(part.model(*part.inputs), part.target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise CheckError(f"TARGET {spec}: loss_fn must return a scalar tensor that depends on the model "
                          f"(e.g. a mean over the batch); it returned {what}")


def reference(plan: Plan) -> Trained:
    """One process on the whole batch. A loss that is not a finite scalar is bad input."""
    _check_loss(plan.spec, call_target(plan.spec, plan.dtype))
    part = call_target(plan.spec, plan.dtype)  # a fresh build: the probe above ran a forward
    result = train(part.model, part, plan)
    bad = [i for i, loss in enumerate(result.losses, 1) if not math.isfinite(loss)]
    if bad:
        raise CheckError(f"TARGET {plan.spec}: the loss is {result.losses[bad[0] - 1]} at step {bad[0]} in one "
                          "process; lower --lr or --steps, or fix the model")
    return result


def unused_parameters(part: Target) -> list[str]:
    """Trainable parameters that get no gradient from one backward on ``part``: a copy of the
    model runs it, with the random-number state restored afterwards, so nothing else changes."""
    model = copy.deepcopy(part.model)
    with torch.random.fork_rng(devices=[]):
        part.loss_fn(model(*part.inputs), part.target).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def train_on_rank(ctx: DistContext, plan: Plan) -> dict:
    """This rank's share through DDP; the compared tensors and the parameters each rank left unused."""
    part = call_target(plan.spec, plan.dtype).shard(ctx.rank, ctx.world_size)
    unused: list = [None] * ctx.world_size
    dist.all_gather_object(unused, unused_parameters(part))
    find_unused = plan.find_unused_parameters or any(unused)
    if plan.strategy == "ddp":
        trained = train(DDP(part.model, find_unused_parameters=find_unused), part, plan)
        return {"grads": trained.grads, "after": trained.after, "unused": unused, "find_unused": find_unused}
    from ddp_demo.parallel import holdings, strategy  # FSDP's imports cost a second: only when asked

    w = strategy.wrap(part.model, ctx, strategy.StrategyConfig(plan.strategy, reduce_dtype=plan.reduce_dtype),
                      lambda params: make_optimizer(plan.optimizer, plan.learning_rate, params))
    trained = train(w.model, part, plan, w.optimizer)
    return {"grads": trained.grads, "after": trained.after, "unused": unused, "find_unused": find_unused,
            "buffers_per_rank": holdings.buffers_differing(part.model, ctx)}


def check_on_rank(ctx: DistContext, plans: list[Plan]) -> list[dict]:
    """Every target in one set of processes (start-up costs seconds, a target milliseconds).

    A target that raises is reported, and the next one runs: an error every rank meets at the
    same point (a shape the model cannot take, say) leaves no collective half-done. One that
    stops some ranks only leaves the others waiting until the timeout fails the whole run.
    """
    out = []
    for plan in plans:
        try:
            out.append(train_on_rank(ctx, plan))
        except Exception:
            out.append({"error": traceback.format_exc()})
    return out


def run_world(world_size: int, plans: list[Plan], timeout: float) -> tuple[list[list[dict]], float]:
    """``[[rank 0's result, rank 1's, ...] for each plan]`` and the wall time, start-up included."""
    start = time.perf_counter()
    per_rank = run_on_ranks(check_on_rank, world_size, (plans,), timeout=timeout)
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(plans))], time.perf_counter() - start
