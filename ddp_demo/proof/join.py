"""Uneven inputs: ranks that run out of batches at different steps, with and without ``Join``.

Rank r gets ``r + 2`` batches (its share of global batches 1, 2, ...), so at N = 3 all
three ranks train steps 1-2, ranks 1 and 2 step 3, and rank 2 alone step 4. Under
``torch.distributed.algorithms.Join`` a rank that has run out keeps answering the others'
collectives with zeros, so on step t, with ``A_t`` the ranks that still have data (k of
them, each with a batch of b samples), every one of them holds

    divide_by_initial_world_size=True  (the default): sum over A_t of its local mean gradient / N
                                                       = (k / N) x the gradient of the mean loss over A_t's k*b samples;
    divide_by_initial_world_size=False:               sum over A_t of its local mean gradient / k
                                                       = the gradient of the mean loss over A_t's samples,

and when all have joined, every rank takes the parameters of the last rank to finish.
``reference`` computes exactly that in one process; ``join_on_rank`` runs it for torch's
DDP or ``ScratchDDP``. Without Join the last all-reduce waits for a rank that will never
come: ``without_join_on_rank`` shows it on process groups with a short timeout, so the
hang ends in a clear error instead of blocking forever.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import STEP, max_abs_diff, within
from ddp_demo.parallel.ddp import ScratchDDP
from ddp_demo.proof.cases import DTYPE_NAMES
from ddp_demo.proof.equivalence import case_optimizer, case_setup, grads_of, shard


def batch_counts(world_size: int) -> list[int]:
    """How many batches each rank has: rank r gets r + 2."""
    return [r + 2 for r in range(world_size)]


WRAPPERS = {"torch": DDP, "scratch": ScratchDDP}


def cases(models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[tuple]:
    """``(model, dtype, wrapper, divide_by_initial_world_size)``."""
    return [(m, d, w, div) for m in models for d in dtypes for w in WRAPPERS for div in (True, False)]


def join_on_rank(ctx: DistContext, model_name: str, dtype: str, wrapper: str, divide_by_initial: bool) -> dict:
    """SGD with momentum on this rank's batches inside ``Join``; ``.grad`` after each of its
    steps, and the parameters once every rank has joined."""
    counts = batch_counts(ctx.world_size)
    model, batches, loss_fn = case_setup(model_name, dtype, steps=max(counts))
    ddp = WRAPPERS[wrapper](model)
    opt = case_optimizer("sgd", ddp.parameters())
    grads = []
    with Join([ddp], divide_by_initial_world_size=divide_by_initial):
        for batch in batches[: counts[ctx.rank]]:
            x, y = shard(batch, ctx)
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            grads.append(grads_of(model))
            opt.step()
    return {"grads": grads, "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


def reference(model_name: str, dtype: str, world_size: int, divide_by_initial: bool) -> dict:
    """The same steps in one process: on step t, the mean loss over the samples of the ranks
    that still have data, scaled by k / N (``divide_by_initial``) or not."""
    counts = batch_counts(world_size)
    model, batches, loss_fn = case_setup(model_name, dtype, steps=max(counts))
    opt = case_optimizer("sgd", model.parameters())
    grads = []
    for t, batch in enumerate(batches):
        active = [r for r in range(world_size) if counts[r] > t]
        shards = [shard(batch, DistContext(r, r, world_size, torch.device("cpu"), "gloo")) for r in active]
        x, y = (torch.cat(parts) for parts in zip(*shards, strict=True))
        scale = len(active) / world_size if divide_by_initial else 1.0
        opt.zero_grad()
        (loss_fn(model(x), y) * scale).backward()
        grads.append(grads_of(model))
        opt.step()
    return {"grads": grads, "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


def without_join_on_rank(ctx: DistContext, wrappers: list[str], timeout_s: float) -> dict[str, dict]:
    """Uneven batches without Join, once per wrapper, each on its own process group whose
    collectives give up after ``timeout_s``. Rank r has r + 1 batches: rank 0 stops after
    step 1, and rank 1's gradient all-reduce of step 2 waits for it. Returns, per wrapper,
    whether this rank finished, and if not, at which step, after how long and why."""
    groups = {w: dist.new_group(timeout=timedelta(seconds=timeout_s)) for w in wrappers}  # all ranks, up front
    out = {}
    for name, group in groups.items():
        model, batches, loss_fn = case_setup("mlp", "float32", steps=ctx.world_size)
        ddp = WRAPPERS[name](model, process_group=group)
        out[name] = {"finished": True}
        for step, batch in enumerate(batches[: ctx.rank + 1], start=1):
            x, y = shard(batch, ctx)
            start = time.perf_counter()
            try:
                loss_fn(ddp(x), y).backward()
            except RuntimeError as e:
                waited, cause = time.perf_counter() - start, str(e).strip().splitlines()[0]
                out[name] = {"finished": False, "step": step, "waited_s": waited, "error": cause, "message": (
                    f"without Join, rank {ctx.rank} (which has {ctx.rank + 1} batches) waited {waited:.1f} s in the "
                    f"gradient all-reduce of step {step} for the ranks that had run out of batches, until its "
                    f"group's {timeout_s:g} s timeout: {cause}")}
                break
        dist.barrier()  # the default group is unaffected: everyone meets here before the next wrapper
    return out


def differences(per_rank: list[dict], case: tuple, want: dict) -> dict:
    """Every rank's gradients (each step it took) and final parameters against ``reference``:
    the largest differences, whether all are within the tolerances, and each rank's step count."""
    got = [res["join"][case] for res in per_rank]
    pairs = [(g, want["grads"][t]) for res in got for t, g in enumerate(res["grads"])]
    pairs_p = [(res["params"], want["params"]) for res in got]
    return {"grads": max(max_abs_diff(a, b) for a, b in pairs), "params": max(max_abs_diff(a, b) for a, b in pairs_p),
            "close": all(within(a, b, STEP[case[1]]) for a, b in pairs + pairs_p),
            "steps": [len(res["grads"]) for res in got]}
