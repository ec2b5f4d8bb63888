"""The measurements of the GPU check (bench.gpu_check), run inside ``core.spawn.run_on_ranks`` workers.

Not yet run on a GPU. ``gradients_on_rank`` compares one step's gradients; ``bench`` times
DDP against the bare module with the benchmark's own step code (bench.timing), on an MLP
sized for a GPU: 4 hidden layers of 8192, 268M parameters (1.07 GB of float32 gradients),
1024 samples per rank, so the step is dominated by matrix multiplies, not launches.
"""

from __future__ import annotations

import copy

from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.bench.numbers import paired, stats
from ddp_demo.bench.ranks import BARE, RAW, STOCK, knobs_on_rank
from ddp_demo.bench.timing import Reps, Step, Workload, build_workload, interleaved, warm_up
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.proof.equivalence import case_setup, grads_of, reference_grads

GPU_MLP = Workload("mlp 4x8192", "mlp", batch=1024, steps=10, mlp_width=8192, mlp_depth=4)
CPU_MLP = Workload("mlp (dry run)", "mlp", batch=32, steps=4, mlp_width=256, mlp_depth=3)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)


def gradients_on_rank(ctx: DistContext) -> dict:
    """Per model: N = 1 DDP vs the bare module (float32 and float64), and this device vs the CPU
    in float64. Run with world size 1: DDP over a group of one."""
    out = {}
    for name in MODEL_NAMES:
        row = {}
        for dtype in ("float32", "float64"):
            model, (batch,), loss_fn = case_setup(name, dtype, steps=1)
            bare, ddp = copy.deepcopy(model).to(ctx.device), DDP(copy.deepcopy(model).to(ctx.device))
            x, y = (t.to(ctx.device) for t in batch)
            loss_fn(bare(x), y).backward()
            loss_fn(ddp(x), y).backward()
            row[f"ddp_vs_bare_{dtype}"] = max_diff(grads_of(ddp.module), grads_of(bare))
            row[f"device_vs_cpu_{dtype}"] = max_diff(grads_of(bare), reference_grads(name, dtype))
        row["ddp_vs_bare"] = max(row["ddp_vs_bare_float32"], row["ddp_vs_bare_float64"])
        out[name] = row
    return out


def overhead_on_rank(ctx: DistContext, w: Workload, r: Reps) -> dict:
    """DDP step over the bare step at N = 1, interleaved."""
    model, x, y = build_workload(w, ctx)
    fns = {"bare": Step(model, x, y, BARE, ctx), "DDP": Step(model, x, y, STOCK, ctx)}
    del model
    warm_up(fns, r)
    return interleaved(fns, {name: w.steps for name in fns}, r, ctx)


def sync_on_rank(ctx: DistContext, w: Workload, r: Reps) -> dict:
    """At N > 1: exposed sync (DDP - bare) and the raw all-reduce's, per bench.ranks.knobs_on_rank."""
    return knobs_on_rank(ctx, w, [RAW, STOCK], r, None)


def bench(device: str, gpus: int) -> dict:
    w, r = (GPU_MLP, Reps(warmup=3, reps=7)) if device == "cuda" else (CPU_MLP, Reps(warmup=1, reps=2))
    t = run_on_ranks(overhead_on_rank, 1, (w, r), timeout=600, device=device, start_method="spawn")[0]
    out = {"workload": vars(w), "step_s": {k: stats(v) for k, v in t.items()},
           "ddp_overhead_n1": paired(t["DDP"], t["bare"], lambda a, b: a / b - 1)}
    out["targets_met"] = {"ddp_overhead_n1 <= 0.03": out["ddp_overhead_n1"]["median"] <= 0.03}
    n = gpus if device == "cuda" else 2
    if n > 1:
        knobs = run_on_ranks(sync_on_rank, n, (w, r), timeout=600, device=device, start_method="spawn")[0]
        rows = {row["name"]: row for row in knobs["rows"]}
        exposed = {k: paired(v["step_s"], v["local_s"], lambda a, b: a - b)["median"] for k, v in rows.items()}
        out |= {"world_size": n, "exposed_sync_s": exposed, "exposed_over_raw": exposed["DDP"] / exposed[RAW.name],
                "raw_all_reduce_check": knobs["check"]}
        out["targets_met"]["exposed_over_raw <= 0.5"] = out["exposed_over_raw"] <= 0.5
    out["ok"] = True  # speed is reported against its targets, not asserted (benchmarks are not tests)
    return out
