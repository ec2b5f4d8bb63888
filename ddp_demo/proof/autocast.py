"""DDP under bf16 autocast equals one process under bf16 autocast, within a derived bound.

Under ``--precision bf16`` the parameters, their gradients and DDP's all-reduce stay in
float32, but each linear layer and convolution takes bf16 inputs and gives a bf16
output, in backward too: the weight gradient ``dY^T X`` is a sum over the batch's samples
that is rounded to bf16 once, at the end. bf16 keeps 8 significant bits (7 stored and the
implicit one), so one rounding changes a value ``v`` by at most ``u |v|`` with the unit
roundoff ``u = 2^-8``.

That one rounding is where DDP and one process part ways. One process rounds the sum over
the whole batch: it holds ``bf16(g)`` with ``g = (g_0 + g_1) / 2``, where ``g_r`` is the
mean over rank r's half of the batch. DDP at N = 2 rounds each rank's sum, then averages
in float32: ``(bf16(g_0) + bf16(g_1)) / 2``. Everything before that rounding is the same
per-sample arithmetic in both (the loss's ``1/B`` differs by a factor 2, which is exact in
binary floating point). So, element by element,

    |DDP - one process| <= u |g| + u (|g_0| + |g_1|) / 2 <= 2u max(|g_0|, |g_1|)

plus float32 rounding (``2^-24``, 65,000 times smaller). The check holds each parameter
tensor to ``BF16_BOUND_FACTOR * u * s`` (``bf16_autocast`` in ``core/tolerances.py``) with
``s`` the largest ``|g_r|`` of that tensor on any rank: the bound above, 2u, doubled for a
rarer effect it leaves out.
A matrix multiply's float32 accumulation order can differ between batch sizes, and where a
result sits next to a bf16 rounding boundary it rounds the other way: one value off by one
bf16 step, ``u`` of itself, in a forward activation, which then moves that sample's
gradient by about ``u`` of its size too. ``s`` is measured, not assumed: it is the
gradient each rank computes without the all-reduce, which is also the negative control.

Negative control: the same comparison for a rank's own gradient (``no_sync``) must fail by
a wide margin, ``BF16_CONTROL_MARGIN`` times the bound, or the bound is too loose to mean anything.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.accumulate import accumulate_gradients, ddp_grad_sync
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.precision import Precision
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import BF16
from ddp_demo.proof.equivalence import case_setup, grads_of, shard


def autocast_grads(model: torch.nn.Module, batch, loss_fn, device: torch.device, sync: bool = True) -> dict:
    """One forward/backward under bf16 autocast through the trainer's own step code."""
    sync_how = ddp_grad_sync(model, 1, never_sync=not sync)
    accumulate_gradients(model, *(t.to(device) for t in batch), loss_fn, 1, sync_how, Precision("bf16", device))
    return {k: v.cpu() for k, v in grads_of(model.module if isinstance(model, DDP) else model).items()}


def autocast_cases_on_rank(ctx: DistContext, models: tuple[str, ...]) -> dict:
    """For each model: this rank's DDP gradient, its own unsynced one, and (every rank
    computes it; rank 0's is used) one process's gradient on the whole batch."""
    out = {}
    for name in models:
        per_sync = {}
        for sync in (True, False):
            model, (batch,), loss_fn = case_setup(name, "float32", steps=1)
            ddp = DDP(model.to(ctx.device))
            per_sync[sync] = autocast_grads(ddp, shard(batch, ctx), loss_fn, ctx.device, sync)
        model, (batch,), loss_fn = case_setup(name, "float32", steps=1)
        out[name] = {"ddp": per_sync[True], "local": per_sync[False],
                     "one_process": autocast_grads(model.to(ctx.device), batch, loss_fn, ctx.device)}
    return out


def verdict(per_model: list[dict]) -> dict:
    """One model's rows (one per rank): the largest difference over the bound, over every
    parameter tensor and rank, for DDP (must be <= 1) and for the unsynced control (must be
    >= BF16_CONTROL_MARGIN)."""
    want = per_model[0]["one_process"]
    # 1e-30: a tensor whose gradient is zero on every rank must then match exactly
    bound = {k: BF16.at(max(max(float(r["local"][k].abs().max()) for r in per_model), 1e-30)) for k in want}

    def worst(kind: str, scale: dict) -> float:
        return max(float((r[kind][k] - want[k]).abs().max()) / scale[k] for r in per_model for k in want)

    return {"ddp_over_bound": worst("ddp", bound), "control_over_bound": worst("local", bound),
            "max_abs_diff": worst("ddp", dict.fromkeys(want, 1.0))}


def verdicts(per_rank: list[dict], models: tuple[str, ...] = MODEL_NAMES) -> dict[str, dict]:
    return {name: verdict([r[name] for r in per_rank]) for name in models}


def check_autocast(world_size: int = 2, models: tuple[str, ...] = MODEL_NAMES, device: str = "cpu",
                   timeout: float = 180, backend: str = "auto") -> dict[str, dict]:
    """Every model's verdict from one process group (start-up costs seconds, a case milliseconds)."""
    per_rank = run_on_ranks(autocast_cases_on_rank, world_size, (models,), timeout=timeout, device=device,
                            backend=backend)
    return verdicts(per_rank, models)
