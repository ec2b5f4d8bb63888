"""The benchmark's bodies: what every worker process runs (via ``core.spawn.run_on_ranks``).

One process group per world size runs :func:`suite_on_rank`, which does that size's
share of the benchmark and returns plain numbers. Rank 0 reports each finished piece
on ``queue`` so the parent process can move its progress bar.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

import torch
import torch.distributed as dist

from ddp_demo.bench.timing import (
    MB,
    Reps,
    Step,
    Variant,
    Workload,
    build_workload,
    ddp_buckets_mb,
    interleaved,
    minor_faults_per_call,
    param_count,
    peak_rss_mb,
    progress,
    reset_peak_rss,
    slowest_rank,
    warm_up,
)
from ddp_demo.bench.trainer import trainer_on_rank
from ddp_demo.core import malloc
from ddp_demo.core.dist import DistContext

BARE = Variant("bare")  # the module alone: no wrapper, no sync
STOCK = Variant("DDP", ddp={})  # what ddp_demo.train wraps with: DistributedDataParallel(model)
TUNED = Variant("DDP tuned", ddp={"bucket_cap_mb": 100, "gradient_as_bucket_view": True, "static_graph": True})
SCRATCH = Variant("ScratchDDP", ddp={}, scratch=True)  # ddp_demo's own DDP, at DDP's default bucket sizes
RAW = Variant("raw all-reduce", flat_all_reduce=True)


def suite_on_rank(ctx: DistContext, tasks: dict, r: Reps, queue=None) -> dict:
    """Run the pieces named in ``tasks`` at this world size: ``weak`` (always),
    ``busbw``, ``knobs`` and ``trainer`` (at N = 2)."""
    out = {"malloc_keeps_freed_memory": malloc.apply(tasks.get("malloc", "keep"))}
    solo_group = dist.new_group([0])  # every rank must take part in creating a group, even one it is not in
    out["weak_scaling"] = weak_scaling_on_rank(ctx, tasks["weak"], r, queue, solo_group)
    if "busbw" in tasks:
        out["busbw"] = busbw_on_rank(ctx, tasks["busbw"], r, queue, solo_group)
    if "knobs" in tasks:
        workload, variants = tasks["knobs"]
        out["knobs"] = knobs_on_rank(ctx, workload, variants, r, queue)
    if "trainer" in tasks:
        out["trainer"] = trainer_on_rank(ctx, *tasks["trainer"], queue)
    if "scratch" in tasks:
        out["scratch"] = {w.label: scratch_on_rank(ctx, w, r, queue) for w in tasks["scratch"]}
    out["threads"] = torch.get_num_threads()
    return out


def weak_scaling_on_rank(ctx: DistContext, workloads: list[Workload], r: Reps, queue, solo_group) -> dict:
    """Per-step seconds of the bare module, stock DDP and tuned DDP on all N ranks, at the
    same per-rank batch whatever N is (weak scaling), and of the same three at N = 1.

    N = 1 is measured inside this job, interleaved with N: rank 0 runs the step alone (DDP
    over a process group holding only rank 0) while the other ranks wait at the next
    barrier, which costs no CPU. So a drift in the machine's speed between two separate
    runs cannot pass for a scaling loss: every ratio comes from back-to-back repetitions.
    """
    out = {}
    for w in workloads:
        model, x, y = build_workload(w, ctx)
        fns = {v.name: Step(model, x, y, v, ctx) for v in (BARE, STOCK, TUNED)}
        fns |= {f"solo {v.name}": solo_step(model, x, y, v, ctx, solo_group) for v in (BARE, STOCK, TUNED)}
        warm_up(fns, r)
        times = interleaved(fns, {name: w.steps for name in fns}, r, ctx)
        faults = {name: [minor_faults_per_call(fn, w.steps)] for name, fn in fns.items()}
        out[w.label] = {"model": w.model, "params": param_count(model), "batch": w.batch, "step_s": times,
                        "page_faults_per_step": {k: v[0] for k, v in slowest_rank(faults, ctx).items()}}  # worst rank
        del fns
        gc.collect()
        progress(queue, ctx, f"N={ctx.world_size} {w.label}")
    return out


def solo_step(model, x: torch.Tensor, y: torch.Tensor, v: Variant, ctx: DistContext, group) -> Callable:
    """The step on rank 0 alone; the other ranks do nothing. (The slowest rank's time is then rank 0's.)"""
    if ctx.rank != 0:
        return lambda: None
    return Step(model, x, y, v, ctx, group=group)


def busbw_on_rank(ctx: DistContext, sizes_mb: list[float], r: Reps, queue, solo_group) -> list[dict]:
    """Seconds per ``all_reduce`` of one float32 buffer of each size over all ranks. Sizes
    under 1 MB also on rank 0 alone, a group of one, where no data moves: what is left is
    the cost of handing the work to gloo's thread and waiting for it to finish."""
    rows = []
    for size in sizes_mb:
        buf = torch.zeros(int(size * MB) // 4, device=ctx.device)  # zeros stay zeros: no overflow to inf
        fns = {"all": functools.partial(dist.all_reduce, buf)}
        if size < 1:
            fns["solo"] = functools.partial(dist.all_reduce, buf, group=solo_group) if ctx.rank == 0 else lambda: None
        calls = min(100, max(1, round(8 / size)))  # >= 8 MB or 100 calls per repetition: far above the clock's tick
        warm_up(fns, r)
        times = interleaved(fns, {name: calls for name in fns}, r, ctx)
        rows.append({"size_mb": size, "time_s": times["all"], "solo_time_s": times.get("solo")})
        progress(queue, ctx, f"all_reduce {size * MB:,.0f} B")
    return rows


def knobs_on_rank(ctx: DistContext, w: Workload, variants: list[Variant], r: Reps, queue) -> dict:
    """For each variant: peak RSS after its warm-up, then its step interleaved with the bare step.

    The bare steps (one per accumulation count) are built and warmed up first, so they
    are part of every variant's memory baseline and not of its own cost.
    """
    model, x, y = build_workload(w, ctx)
    check = check_raw_all_reduce(model, x, y, ctx)
    alone = all_reduce_alone(param_count(model), w.steps, r, ctx)
    local = {k: Step(model, x, y, Variant("local", accumulate=k), ctx) for k in {v.accumulate for v in variants}}
    warm_up(local, r)
    rows = []
    for v in variants:
        base = reset_peak_rss()
        step = Step(model, x, y, v, ctx)
        warm_up({v.name: step}, r)
        peak = peak_rss_mb()
        buckets = ddp_buckets_mb(step.model) if v.ddp is not None else [param_count(model) * 4 / MB]
        n = max(1, w.steps // v.accumulate)  # about the same number of forward/backward passes per repetition
        times = interleaved({"local": local[v.accumulate], "variant": step}, {"local": n, "variant": n}, r, ctx)
        rows.append({"name": v.name, "ddp": v.ddp, "flat_all_reduce": v.flat_all_reduce, "accumulate": v.accumulate,
                     "local_s": times["local"], "step_s": times["variant"], "rss_base_mb": base, "rss_peak_mb": peak,
                     "buckets_mb": buckets})
        del step  # freed by the next reset_peak_rss(), which collects garbage first
        progress(queue, ctx, v.name)
    return {"params": param_count(model), "batch": w.batch, "rows": rows, "check": check, "all_reduce_alone_s": alone}


def all_reduce_alone(numel: int, calls: int, r: Reps, ctx: DistContext) -> list[float]:
    """Seconds per ``all_reduce`` of a float32 buffer the size of all gradients, with no step around it."""
    fn = functools.partial(dist.all_reduce, torch.zeros(numel, device=ctx.device))
    warm_up({"all_reduce": fn}, r)
    return interleaved({"all_reduce": fn}, {"all_reduce": calls}, r, ctx)["all_reduce"]


def check_raw_all_reduce(model, x: torch.Tensor, y: torch.Tensor, ctx: DistContext) -> dict:
    """The raw all-reduce is hand-written, so it is checked against the real thing: after one
    step its gradients must equal DDP's (up to float32 rounding); the negative control, no
    sync at all, must differ from DDP's (on N > 1 ranks with different data)."""
    steps = {"raw": Step(model, x, y, Variant("raw", flat_all_reduce=True), ctx),
             "ddp": Step(model, x, y, STOCK, ctx), "unsynced": Step(model, x, y, Variant("local"), ctx)}
    grads = {}
    for name, step in steps.items():
        step()
        grads[name] = step.gradients()
    return {"max_diff_raw_vs_ddp": float((grads["raw"] - grads["ddp"]).abs().max()),
            "max_diff_unsynced_vs_ddp": float((grads["unsynced"] - grads["ddp"]).abs().max())}


def scratch_on_rank(ctx: DistContext, w: Workload, r: Reps, queue) -> dict:
    """ddp_demo's ScratchDDP beside stock DDP, the raw flat all-reduce and the bare step,
    interleaved; and, as the wrapper timed must be the one proven, its gradients against DDP's."""
    model, x, y = build_workload(w, ctx)
    fns = {v.name: Step(model, x, y, v, ctx) for v in (BARE, STOCK, SCRATCH, RAW)}
    warm_up(fns, r)
    times = interleaved(fns, {name: w.steps for name in fns}, r, ctx)
    diff = float((fns[SCRATCH.name].gradients() - fns[STOCK.name].gradients()).abs().max())
    progress(queue, ctx, f"ScratchDDP {w.label}")
    return {"model": w.model, "params": param_count(model), "batch": w.batch, "step_s": times,
            "max_diff_vs_ddp": diff}
