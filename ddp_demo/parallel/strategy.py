"""Three ways to split one Module's training over N ranks: ``ddp``, ``zero``, ``fsdp``.

The seed article's point is that a Module owns its parameters. The strategies differ in how
much of that ownership each rank keeps:

- ``ddp``: every rank owns all of it (parameters, gradients, optimizer state); backward
  all-reduces the gradients (``DistributedDataParallel``, or ddp_demo's ``ScratchDDP``).
- ``zero``: DDP as above, but each rank keeps the optimizer state of only its share of the
  parameters, steps those, and broadcasts them to the others afterwards
  (``ZeroRedundancyOptimizer``, ZeRO stage 1: Rajbhandari et al., 2020).
- ``fsdp``: each rank keeps 1/N of every parameter, of its gradient and of its optimizer
  state (``torch.distributed.fsdp.fully_shard``, FSDP2). Forward and backward all-gather a
  block's parameters just before it runs and free them after; backward reduce-scatters the
  gradients, so each rank receives the average of its own slice only. ``--ddp scratch`` picks
  ddp_demo's own ``ScratchFSDP`` (parallel/fsdp.py, proven equal to fully_shard) instead.

:func:`wrap` takes a built Module and returns a :class:`Wrapped`: the model to call, the
user's Module (parameter names without prefixes), and an optimizer built for the strategy.
:func:`full_state_dict` gives rank 0 the whole ``state_dict`` in the format DDP's ``final.pt``
has. What each rank holds is read by ``ddp_demo.parallel.holdings``.

Without a process group (plain ``python``) every strategy is the bare Module and its
optimizer: there is nothing to split with.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.accumulate import GradSync
from ddp_demo.core.dist import DistContext
from ddp_demo.parallel.ddp import ScratchDDP
from ddp_demo.parallel.fsdp import ScratchFSDP

STRATEGIES = ("ddp", "zero", "fsdp")
DDP_IMPLS = ("torch", "scratch")
# Under --precision bf16, fsdp computes with bf16 copies of the parameters but reduce-scatters
# the gradients in float32: the average over ranks then adds no rounding beyond what a float32
# gradient has (FSDP2 docs, MixedPrecisionPolicy.reduce_dtype). The sharded parameters and the
# optimizer stay in the parameters' own dtype.
BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
REDUCE_DTYPES = ("float32", "bfloat16")  # StrategyConfig.reduce_dtype: below the parameters' own (float64 or float32)
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class StrategyConfig:
    """How to split the training of one Module over the ranks."""

    name: str = "ddp"
    """ddp, zero or fsdp (module docstring)."""
    ddp_impl: str = "torch"
    """torch's wrapper or ddp_demo's: under ddp and zero DDP or ScratchDDP (ZeroRedundancyOptimizer
    is an optimizer: it works over either); under fsdp fully_shard or ScratchFSDP."""
    precision: str = "fp32"
    """The trainer's --precision: bf16 gives fsdp its MixedPrecisionPolicy (BF16_POLICY)."""
    reduce_grads: bool = True
    """False is the negative control: every rank trains on its own gradient, nothing is averaged."""
    reduce_dtype: str | None = None
    """fsdp (fully_shard) only: reduce-scatter the gradients in this dtype (float32 or bfloat16) instead of the
    parameters' own (None), as MixedPrecisionPolicy.reduce_dtype does; the average then carries its rounding."""

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        if self.ddp_impl not in DDP_IMPLS:
            raise ValueError(f"unknown DDP implementation {self.ddp_impl!r}; choose one of {', '.join(DDP_IMPLS)}")
        if self.reduce_dtype is not None:
            self._check_reduce_dtype()

    def _check_reduce_dtype(self) -> None:
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"unknown reduce dtype {self.reduce_dtype!r}; choose one of {', '.join(REDUCE_DTYPES)}")
        if self.name != "fsdp" or self.ddp_impl != "torch":
            raise ValueError(f"a reduce dtype ({self.reduce_dtype}) is fully_shard's MixedPrecisionPolicy: it needs "
                             f"strategy fsdp with torch's implementation, not {self.name} with {self.ddp_impl}'s; "
                             "drop the reduce dtype or use fsdp")

    def policy(self) -> MixedPrecisionPolicy:
        """fully_shard's mixed precision: bf16 compute under --precision bf16, the reduce dtype if one is set."""
        base = BF16_POLICY if self.precision == "bf16" else MixedPrecisionPolicy()
        if self.reduce_dtype is None:
            return base
        return MixedPrecisionPolicy(param_dtype=base.param_dtype, reduce_dtype=getattr(torch, self.reduce_dtype))


@dataclass
class Wrapped:
    """What a strategy hands the training loop."""

    strategy: str
    model: nn.Module  # call this one: forward and backward go through the strategy's hooks
    module: nn.Module  # the user's Module: named_parameters() and state_dict() keys without prefixes
    optimizer: torch.optim.Optimizer
    replicas: Replicas | None = None  # fsdp: the 0-dim parameters it keeps whole
    reduce: bool = True  # StrategyConfig.reduce_grads: False never averages (the negative control)
    sharding: ScratchFSDP | None = None  # fsdp with --ddp scratch: ddp_demo's own sharding, in place of fully_shard

    def set_grad_sync(self, on: bool) -> None:
        """Whether the coming backward averages gradients over the ranks (off: accumulate locally)."""
        if self.sharding is not None:  # its control is reduce=False, set at construction
            self.sharding.set_requires_gradient_sync(on)
        elif isinstance(self.model, FSDPModule):  # its control is OwnGradient: the reduce-scatter still runs
            self.model.set_requires_gradient_sync(on)
            self.replicas.syncing = on
        elif hasattr(self.model, "require_backward_grad_sync"):  # DDP's and ScratchDDP's no_sync switch
            self.model.require_backward_grad_sync = on and self.reduce

    def grad_sync(self, k: int) -> GradSync:
        """Accumulation over ``k`` micro-batches: only the last one's backward averages.

        DDP decides in forward whether backward all-reduces; FSDP2 decides in backward whether to
        reduce-scatter. Switching before forward serves both."""

        @contextlib.contextmanager
        def context(is_last: bool) -> Iterator[None]:
            if is_last:
                yield
                return
            self.set_grad_sync(False)
            try:
                yield
            finally:
                self.set_grad_sync(True)

        def backward(loss: torch.Tensor) -> None:
            (loss / k if k > 1 else loss).backward()

        return GradSync(context, backward)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks ``fsdp`` shards one by one, before the root takes the rest.

    The rule: every direct child of the root that holds parameters is a block, except
    containers (``ModuleList``, ``ModuleDict``, ``Sequential``), whose children are looked at
    the same way instead, so a transformer's ``layers`` yields one block per layer. A block
    that shares a parameter with another (tied weights) is left to the root: fully_shard lets
    one group own a parameter, and the root's group is alive for the whole forward and backward.
    The article's MLP gives ``linear1`` and ``linear2``; the classifier ``features`` and ``head``.
    """
    found: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, nn.ModuleList | nn.ModuleDict | nn.Sequential):
            found += shard_units(child)
        elif any(True for _ in child.parameters()):
            found.append(child)
    owners: dict[int, int] = {}
    for block in found:
        for p in block.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [b for b in found if all(owners[id(p)] == 1 for p in b.parameters())]


class Replicas:
    """fully_shard refuses 0-dim parameters (a dimension 0 is what it splits), such as the
    article's ``MultiplyByTwo.multiplier``. Those stay whole on every rank, as under DDP, and a
    hook averages their gradient once backward has accumulated it (when syncing)."""

    def __init__(self, params: list[nn.Parameter], world_size: int, reduce: bool):
        self.syncing, self.reduce, self.world_size = True, reduce, world_size
        for p in params:
            p.register_post_accumulate_grad_hook(self._average)

    def _average(self, p: nn.Parameter) -> None:
        if self.syncing and self.reduce:
            dist.all_reduce(p.grad)  # SUM, then divide: gloo has no AVG
            p.grad.div_(self.world_size)


class OwnGradient:
    """A reduce-scatter that reduces nothing (the fsdp negative control): each rank's shard
    receives its own slice of its own gradient, what N copies of it would average to. Passed
    to ``FSDPModule.set_custom_reduce_scatter``, which calls ``allocate`` and ``__call__``."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        n = group.size()
        mine = input_tensor.view(n, -1)[group.rank()]
        # FSDP2 averages with AVG, or pre-divides by N and sums (float64: _get_gradient_divide_factors)
        output_tensor.copy_(mine if op == dist.ReduceOp.AVG else mine * n)
        return None


def shard_fully(module: nn.Module, cfg: StrategyConfig, ctx: DistContext) -> list[nn.Parameter]:
    """``fully_shard`` each block (:func:`shard_units`), then the root; returns the 0-dim
    parameters left whole (:class:`Replicas`)."""
    scalars = [p for p in module.parameters() if p.dim() == 0]
    policy = cfg.policy()
    # The mesh follows ctx.device (gloo on the CPU, nccl on CUDA). fully_shard's default mesh is
    # CUDA whenever CUDA exists, which would break --device cpu on a machine with GPUs.
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for unit in [*shard_units(module), module]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=set(scalars) or None)
    if not cfg.reduce_grads:
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.set_custom_reduce_scatter(OwnGradient())
    return scalars


def wrap(module: nn.Module, ctx: DistContext, cfg: StrategyConfig, make_optimizer: OptimizerFactory) -> Wrapped:
    """Wrap ``module`` (already on ``ctx.device``) for ``cfg.name`` and build its optimizer.

    ``make_optimizer(params)`` builds the optimizer one process would use; under ``zero`` it is
    built once on the whole parameter list (no state yet) as the template of each rank's local
    optimizer: the same class, parameter groups and settings."""
    if not ctx.distributed:
        return Wrapped(cfg.name, module, module, make_optimizer(module.parameters()))
    if cfg.name == "fsdp" and cfg.ddp_impl == "scratch":
        # Shards in place as fully_shard does, same blocks; 0-dim parameters are one row, so no Replicas.
        sharding = ScratchFSDP(module, shard_units(module), reduce=cfg.reduce_grads)
        return Wrapped("fsdp", module, module, make_optimizer(module.parameters()), reduce=cfg.reduce_grads,
                       sharding=sharding)
    if cfg.name == "fsdp":
        scalars = shard_fully(module, cfg, ctx)
        replicas = Replicas(scalars, ctx.world_size, cfg.reduce_grads)
        return Wrapped("fsdp", module, module, make_optimizer(module.parameters()), replicas, cfg.reduce_grads)
    model = ScratchDDP(module) if cfg.ddp_impl == "scratch" else \
        DDP(module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters())
    if cfg.name == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer  # 0.3 s to import: zero runs only

        # Each rank keeps the state of its share only; step() updates that share and broadcasts it.
        # Only the defaults the class takes: AdamW's include decoupled_weight_decay, which its
        # __init__ refuses (torch 2.13), so passing them all breaks zero for AdamW.
        accepted = inspect.signature(type(optimizer)).parameters
        optimizer = ZeroRedundancyOptimizer(optimizer.param_groups, optimizer_class=type(optimizer),
                                            **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    wrapped = Wrapped(cfg.name, model, module, optimizer, reduce=cfg.reduce_grads)
    wrapped.set_grad_sync(True)
    return wrapped


def full_state_dict(wrapped: Wrapped, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """Rank 0: the Module's whole ``state_dict`` on the CPU, keys without prefixes (as DDP's
    ``final.pt``); other ranks: None. Every rank must call it: under fsdp it all-gathers."""
    if wrapped.sharding is not None:
        state = wrapped.sharding.full_state_dict()  # every rank gathers; rank 0 keeps it
        return {k: v.cpu() for k, v in state.items()} if ctx.is_main else None
    if wrapped.strategy == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # ~1 s to import

        # full_state_dict: whole tensors, not DTensor shards; cpu_offload: gathered to rank 0's CPU only.
        state = get_model_state_dict(wrapped.module, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
        return state if ctx.is_main else None
    if not ctx.is_main:
        return None
    return {k: v.detach().cpu() for k, v in wrapped.module.state_dict().items()}
