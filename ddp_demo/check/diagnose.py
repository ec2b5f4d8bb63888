"""Why DDP did not equal one process: causes detected in the model and the numbers, not guessed.

Each detector looks for one cause and names what it found:

- parameters that get no gradient (from the runs: some rank's backward left them ``None``);
- BatchNorm layers in training mode (from the model's modules);
- modules that draw random numbers in training mode (from torch's random-number state,
  which a forward hook reads before and after each module);
- a loss that sums over the batch (from the numbers: DDP's gradient times N is exactly the
  single-process gradient, at every failing N);
- under ``--reduce-dtype``, gradients averaged in a lower dtype (from the numbers: the same fsdp
  run reducing in the parameters' dtype, reduce_dtype.py).

When none applies the cause is "not recognised" and the report prints every tensor's difference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ddp_demo.check.diagnose_step import step_causes
from ddp_demo.check.target import Target
from ddp_demo.check.verdict import Cause, Verdict
from ddp_demo.core.tolerances import difference
from ddp_demo.parallel.sync_batchnorm import SyncBatchNorm


def unused_parameters(v: Verdict) -> Cause | None:
    names = sorted({n for w in v.worlds for n in w.unused})
    if not names or v.plan.find_unused_parameters:
        return None
    return Cause(
        "unused_parameters", f"parameters that receive no gradient: {', '.join(names)}",
        "plain DDP(model) waits for every parameter's gradient, so it raises \"Expected to have finished "
        "reduction in the prior iteration\" at the next step, or hangs when only some ranks skip them "
        "(the check itself ran DDP with find_unused_parameters=True to compare the rest)",
        "remove them, or freeze them (p.requires_grad_(False)); or pass find_unused_parameters=True to DDP, "
        "which walks the autograd graph after every forward to find them (a cost each step), and check with "
        "--find-unused-parameters", names)


def batchnorm_layers(model: nn.Module) -> list[str]:
    """BatchNorm layers that normalise with the batch's statistics (training mode), unsynced."""
    synced = (nn.SyncBatchNorm, SyncBatchNorm)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, synced) and m.training]


def _shown(model: nn.Module, names: list[str]) -> str:
    """``features.1 (BatchNorm2d)``: the name a user greps for, and what the module is."""
    modules = dict(model.named_modules())
    return ", ".join(f"{n} ({type(modules[n]).__name__})" if n else f"{type(model).__name__}.forward itself"
                     for n in names)


def buffers_per_rank(v: Verdict) -> Cause | None:
    """fsdp: FSDP2 never broadcasts buffers (pytorch/torchtitan#670), so each rank's running
    statistics follow its own samples and the full state dict silently keeps rank 0's."""
    names = sorted({n for w in v.worlds for r in (w.ranks or []) for n in r.get("buffers_per_rank", [])})
    if not names:
        return None
    return Cause(
        "buffers_per_rank", f"buffers left per rank under fsdp: {', '.join(names)}",
        "FSDP2 shards parameters but never syncs buffers: each rank's copy follows its own samples, and the "
        "full state dict keeps rank 0's",
        "model = ddp_demo.convert_sync_batchnorm(model) before fully_shard: the statistics are then computed "
        "over every rank's samples, so every rank's buffers agree", names)


def batchnorm(v: Verdict) -> Cause | None:
    names = batchnorm_layers(v.target.model)
    if not names:
        return None
    return Cause(
        "batchnorm", f"BatchNorm layers in training mode: {_shown(v.target.model, names)}",
        "each rank normalises with its own shard's mean and variance, while one process uses the whole "
        "batch's, so outputs, gradients and running statistics differ",
        "model = ddp_demo.convert_sync_batchnorm(model) before DDP(model): statistics over every rank's "
        "samples (torch.nn.SyncBatchNorm on CUDA, ddp_demo's own on the CPU)", names)


def random_modules(part: Target) -> list[str]:
    """Modules whose forward changes torch's CPU random-number state, innermost first found."""
    model, before, drew = copy.deepcopy(part.model), {}, []

    def pre(name):
        return lambda m, args: before.__setitem__(name, torch.get_rng_state())

    def post(name):
        return lambda m, args, out: drew.append(name) if not torch.equal(before[name], torch.get_rng_state()) else None

    handles = [h for name, m in model.named_modules()
               for h in (m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name)))]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model(*part.inputs)
    finally:
        for h in handles:
            h.remove()
    return [n for n in dict.fromkeys(drew) if not any(o != n and (n == "" or o.startswith(n + ".")) for o in drew)]


def randomness(v: Verdict) -> Cause | None:
    names = random_modules(v.target)
    if not names:
        return None
    return Cause(
        "randomness", f"modules that draw random numbers in training mode: {_shown(v.target.model, names)}",
        "each rank draws its own random numbers (a dropout mask, say) for its samples, so they are not the "
        "ones one process draws for the same samples",
        "to check the rest of the model, return it with the randomness off (model.eval() for dropout, or p=0); "
        "in real training, differing draws are expected and not an error", names)


def summed_loss(v: Verdict) -> Cause | None:
    """DDP averages gradients over ranks; a loss that sums gives each rank 1/N of the sum."""
    failing = [w for w in v.worlds if w.world_size > 1 and w.ranks and not w.numbers_match]
    if not failing:
        return None
    for w in failing:
        tol = {r.name: r.tolerance for r in w.rows if r.stage == "gradient"}
        got = w.ranks[0]["grads"]
        scaled = {n: None if g is None else g * w.world_size for n, g in got.items()}
        if any(difference(scaled[n], want) > w.world_size * tol[n] for n, want in v.reference.grads.items()):
            return None
        if not any(g is not None and bool(g.any()) for g in v.reference.grads.values()):
            return None
    sizes = ", ".join(str(w.world_size) for w in failing)
    return Cause(
        "summed_loss", f"the loss sums over the batch: DDP's gradient is one process's divided by N (N = {sizes})",
        "DDP averages the ranks' gradients, which equals one process's gradient only when each rank's loss is "
        "a mean over its samples",
        "average instead of summing (e.g. reduction='mean'), or multiply the loss by the world size")


def lower_reduce_dtype(v: Verdict) -> Cause | None:
    """The reduce dtype's own effect (reduce_dtype.Effect) over the tolerance at some N."""
    over = [e for e in v.reduce_effects if not e.ok]
    if not over:
        return None
    worst, dtype, low = max(over, key=lambda e: e.moved), v.tolerance["dtype"], v.plan.reduce_dtype
    return Cause(
        "reduce_dtype", f"fsdp reduce-scatters gradients in {low}, below the parameters' {dtype}: that alone "
        f"moved the parameters by {worst.moved:.2g} at N={worst.world_size}",
        f"MixedPrecisionPolicy(reduce_dtype={low}) rounds every averaged gradient to {low}; the same run reducing "
        f"in {dtype} differs from one process by {worst.baseline:.2g}",
        f"reduce in the parameters' dtype (MixedPrecisionPolicy(reduce_dtype=None): drop --reduce-dtype); or, "
        f"if the model is float32 and reduces in float32, check it in float32 (--dtype keep); or "
        f"accept {low}'s rounding as the bound of your training")


def error(v: Verdict) -> Cause | None:
    failed = [w for w in v.worlds if w.error]
    if not failed:
        return None
    return Cause("error", failed[0].error.strip().splitlines()[0],
                 "the model, the loss or the step raised, or a rank stopped answering, on N processes",
                 "run the step on one rank's share (B / N samples) and read the traceback (--json keeps every "
                 "rank's)")


def diagnose(v: Verdict) -> list:
    """Every cause found; empty when the check passes."""
    if v.ok:
        return []
    causes = [c for c in (error(v), unused_parameters(v)) if c]
    if not all(w.numbers_match for w in v.worlds if not w.error):
        causes += step_causes(v)
        found = (lower_reduce_dtype(v), buffers_per_rank(v), batchnorm(v), randomness(v), summed_loss(v))
        causes += [c for c in found if c]
    if not causes:
        causes.append(Cause("not_recognised", "cause not recognised",
                            "no known cause fits; the table below shows every tensor's difference", ""))
    return causes
