"""What a sharded checkpoint costs: save and load time, bytes on disk per rank, at N = 1, 2, 4.

    python -m ddp_demo.bench checkpoint [--strategies ddp zero fsdp] [--sizes 1 2 4] [--reps 3] [--quick]

The model is the benchmark's largest CPU workload (bench/run.py's ``mlp``: 3 hidden layers of
1024, 3.2 M parameters, float32) with Adam, after one step (so the optimizer state exists: two
more tensors per parameter). Each world size is one group of processes (core/spawn.py, a
FileStore, no ports); each rank saves through resilience/sharded.py into a scratch directory and
loads it back into a freshly wrapped model. A time is the slowest rank's, the median of
``--reps``; the save includes rank 0's checksums and the rename. "bytes/rank" is the size of each
rank's ``__R_0.distcp`` file (DCP writes a replicated tensor once, spreading the replicas'
tensors over the ranks; under zero each rank also writes its own share of the optimizer state).
Benchmarks are not tests: the numbers depend on the disk and on the machine's load. ``--quick``
(a 64-wide MLP, N = 1 and 2, one repetition) checks the pipeline in seconds and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from ddp_demo.bench.timing import Workload, build_workload, param_count, slowest_rank, timed
from ddp_demo.core.dist import DistContext
from ddp_demo.core.spawn import run_on_ranks

LARGEST = Workload("mlp", "mlp", 32, 6)  # bench/run.py's full plan: width 1024, depth 3
QUICK = Workload("mlp", "mlp", 8, 1, mlp_width=64, mlp_depth=2)


def _wrapped(strategy: str, ctx: DistContext, workload: Workload):
    from ddp_demo.parallel.strategy import StrategyConfig, wrap

    model, x, y = build_workload(workload, ctx)
    w = wrap(model, ctx, StrategyConfig(strategy), lambda params: torch.optim.Adam(params, lr=1e-3))
    return w, x, y


def on_rank(ctx: DistContext, strategies: list[str], reps: int, scratch: str, workload: Workload = LARGEST) -> dict:
    """Every strategy in turn, in this one group: ``{strategy: this rank's row}``."""
    return {strategy: _one_strategy(ctx, strategy, reps, scratch, workload) for strategy in strategies}


def _one_strategy(ctx: DistContext, strategy: str, reps: int, scratch: str, workload: Workload) -> dict:
    from ddp_demo.resilience import sharded

    w, x, y = _wrapped(strategy, ctx, workload)
    torch.nn.functional.cross_entropy(w.model(x), y).backward()
    w.optimizer.step()
    fresh, _, _ = _wrapped(strategy, ctx, workload)
    saves, loads = [], []
    for rep in range(reps):
        d = Path(scratch) / f"{strategy}-{ctx.world_size}-{rep}"
        saves.append(timed(lambda d=d: sharded.save(d, 1, w.module, w.optimizer, {}, ctx.is_main), 1, ctx))
        step = d / "step-000001"
        meta = torch.load(step / sharded.META, weights_only=True)
        loads.append(timed(lambda step=step, meta=meta: sharded.load(step, fresh.module, fresh.optimizer, meta),
                            1, ctx))
    slowest = slowest_rank({"save": saves, "load": loads}, ctx)  # each repetition on the slowest rank
    step = Path(scratch) / f"{strategy}-{ctx.world_size}-0" / "step-000001"
    mine = step / f"__{ctx.rank}_0.distcp"
    return {"save_s": statistics.median(slowest["save"]), "load_s": statistics.median(slowest["load"]),
            "bytes": mine.stat().st_size if mine.exists() else 0,
            "total": sum(p.stat().st_size for p in step.iterdir()), "params": param_count(w.module)}


def measure(strategies: list[str], sizes: list[int], reps: int, workload: Workload = LARGEST) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in sizes:
            ranks = run_on_ranks(on_rank, n, (strategies, reps, scratch, workload), timeout=600)
            rows += [{"strategy": s, "n": n, **ranks[0][s], "bytes_per_rank": [r[s]["bytes"] for r in ranks]}
                     for s in strategies]
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"model: bench mlp, {rows[0]['params']:,} float32 parameters + Adam state; median of the slowest rank",
             f"{'strategy':<8} {'N':>2} {'save s':>7} {'load s':>7} {'total MB':>9}  MB per rank (__R_0.distcp)"]
    for r in rows:
        per = " ".join(f"{b / 1e6:.1f}" for b in r["bytes_per_rank"])
        lines.append(f"{r['strategy']:<8} {r['n']:>2} {r['save_s']:>7.3f} {r['load_s']:>7.3f} "
                     f"{r['total'] / 1e6:>9.1f}  {per}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_demo.bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", nargs="+", default=["ddp", "zero", "fsdp"], choices=["ddp", "zero", "fsdp"])
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4], help="world sizes")
    p.add_argument("--reps", type=int, default=3, help="saves and loads per configuration (the median is shown)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny MLP at N = 1, 2, one repetition (ignores --sizes, --reps): checks, measures nothing")
    args = p.parse_args(argv)
    sizes, reps, workload = ([1, 2], 1, QUICK) if args.quick else (args.sizes, args.reps, LARGEST)
    print(report(measure(args.strategies, sizes, reps, workload)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
