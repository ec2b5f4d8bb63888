"""Why anyone shards: what one rank holds under ddp, zero and fsdp, and what a step costs.

    python -m ddp_demo.bench memory                 # 25.2M float32 parameters, Adam, N = 1, 2, 4
    python -m ddp_demo.bench memory --quick         # a tiny model: checks the pipeline, numbers mean nothing
    ddp-demo-bench memory --world-sizes 2           # the same, as a console script

For each strategy and N, a fresh set of N processes (so each peak is its own) builds the same
model (``--depth`` Linear layers of ``--width`` x ``--width``, float32), wraps it
(``parallel/strategy.py``), and takes ``--steps`` Adam steps after one warm-up step. Rank by
rank it reports the bytes of parameters, gradients and optimizer state it holds after the last
step (``holdings.held_bytes``: counted from its tensors), its peak RSS (VmHWM) and the RSS it
had before the model existed, and the median step time. The table shows the largest rank.

Expected, with P the parameters' bytes: ddp holds P + P + 2P (Adam's two moments) on every rank;
zero the same but about 2P / N of optimizer state; fsdp (P + P + 2P) / N, plus padding where a
row count does not divide by N (``holdings``). Adam's ``step`` counters add 4 bytes per tensor.
Peak RSS is shown twice: while the whole model is built and wrapped (every rank builds all of it
first), and during the steps, which adds what the byte counts leave out: DDP's gradient buckets
(a second copy of the gradients), fsdp's gathered block and its whole gradient, temporaries.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ddp_demo.bench.timing import peak_rss_mb, reset_peak_rss
from ddp_demo.core.dist import DistContext
from ddp_demo.core.flags import add_options, option, parse_into
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.parallel.holdings import held_bytes
from ddp_demo.parallel.strategy import STRATEGIES, StrategyConfig, wrap

MB = 1e6


@dataclass(frozen=True)
class MemoryJob:
    """One model, one optimizer, a few steps."""

    width: int = 2048  # features in and out of every Linear layer
    depth: int = 6  # Linear layers (with ReLU between): 6 x (2048^2 + 2048) = 25.2M parameters
    global_batch: int = 16  # samples per step over all ranks (divisible by every N)
    steps: int = 5  # timed steps, after one warm-up step

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(self.depth):
            layers += [nn.Linear(self.width, self.width)] + ([nn.ReLU()] if i < self.depth - 1 else [])
        return nn.Sequential(*layers)

    def parameter_bytes(self) -> int:
        return 4 * self.depth * (self.width * self.width + self.width)


def return_freed_memory() -> bool:
    """Make glibc hand blocks of 128 KiB and more back to the OS when they are freed.

    By default glibc raises its mmap threshold each time a big block is freed (mallopt(3),
    M_MMAP_THRESHOLD, up to 32 MiB), so later blocks of that size come from the heap and stay
    resident after they are freed. FSDP allocates and frees each block's gathered parameters and
    gradients every step: measured here at N = 2, its peak RSS then exceeded DDP's (1100 MB
    against 941 MB on this model) while it held half the bytes. A fixed threshold makes RSS
    follow what is alive. Returns False where glibc is not there to ask."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD, <malloc.h>
    except (OSError, AttributeError):
        return False


def memory_on_rank(ctx: DistContext, strategy: str, job: MemoryJob, malloc: str = "return") -> dict:
    """Build, wrap and step the job's model; what this rank holds, its peak RSS, its step times."""
    if malloc == "return":
        return_freed_memory()
    before = reset_peak_rss()  # after the imports and the process group: the baseline
    model = job.model()
    w = wrap(model, ctx, StrategyConfig(strategy), lambda params: torch.optim.Adam(params, lr=1e-4))
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(job.global_batch // ctx.world_size, job.width, generator=g)
    y = torch.randn(job.global_batch // ctx.world_size, job.width, generator=g)
    whole_peak = peak_rss_mb()  # building the whole model, then wrapping it
    wrapped = reset_peak_rss()  # a new window for the steps alone
    times = []
    for _ in range(job.steps + 1):
        start = time.perf_counter()
        w.optimizer.zero_grad()
        nn.functional.mse_loss(w.model(x), y).backward()
        w.optimizer.step()
        times.append(time.perf_counter() - start)
    return {"held": held_bytes(w), "rss_before_mb": before, "build_peak_mb": whole_peak, "rss_wrapped_mb": wrapped,
            "steps_peak_mb": peak_rss_mb(), "step_s": statistics.median(times[1:])}


def expected_mb(strategy: str, n: int, job: MemoryJob) -> float:
    """The three together, from the module docstring's rule (padding and ``step`` counters left out)."""
    p = job.parameter_bytes()
    return {"ddp": 4 * p, "zero": 2 * p + 2 * p / n, "fsdp": 4 * p / n}[strategy] / MB


def measure(job: MemoryJob, world_sizes: list[int], timeout: float, malloc: str = "return") -> list[dict]:
    rows = []
    for n in world_sizes:
        for strategy in STRATEGIES:
            per_rank = run_on_ranks(memory_on_rank, n, (strategy, job, malloc), timeout=timeout,
                                    start_method="spawn")  # RSS of a fresh interpreter, not a fork's
            largest = max(per_rank, key=lambda r: sum(r["held"].values()))
            peaks = {k: max(r[k] or 0.0 for r in per_rank) for k in ("build_peak_mb", "steps_peak_mb")}
            rows.append({"strategy": strategy, "world_size": n, **largest, **peaks,
                         "step_s": statistics.median(r["step_s"] for r in per_rank)})
    return rows


def render(rows: list[dict], job: MemoryJob) -> str:
    ddp2 = next((r["step_s"] for r in rows if r["strategy"] == "ddp" and r["world_size"] == 2), None)
    lines = [f"{job.parameter_bytes() / 4 / 1e6:.1f}M float32 parameters ({job.depth} x Linear({job.width}, "
             f"{job.width})), Adam, global batch {job.global_batch}; per rank, the rank holding most; MB = 1e6 bytes",
             "| strategy | N | parameters MB | gradients MB | optimizer state MB | together MB | expected MB "
             "| peak RSS MB: build + wrap, steps (before the model) | step s | step vs ddp, N = 2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        h = r["held"]
        ratio = f"{r['step_s'] / ddp2:.2f}x" if ddp2 and r["world_size"] == 2 else ""
        lines.append(f"| {r['strategy']} | {r['world_size']} | {h['parameters'] / MB:.1f} | {h['gradients'] / MB:.1f} "
                     f"| {h['optimizer state'] / MB:.1f} | {sum(h.values()) / MB:.1f} "
                     f"| {expected_mb(r['strategy'], r['world_size'], job):.1f} "
                     f"| {r['build_peak_mb']:.0f}, {r['steps_peak_mb']:.0f} ({r['rss_before_mb'] or 0:.0f}) "
                     f"| {r['step_s']:.3f} | {ratio} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class MemoryOptions:
    width: int = option(MemoryJob.width, "features in and out of every Linear layer")
    depth: int = option(MemoryJob.depth, "number of Linear layers")
    steps: int = option(MemoryJob.steps, "timed Adam steps, after one warm-up step")
    world_sizes: tuple[int, ...] = option((1, 2, 4), "numbers of processes N", type_=int, nargs="+")
    quick: bool = option(False, "a tiny model: checks the pipeline in seconds, measures nothing")
    malloc: str = option("return", "return: freed blocks of 128 KiB and more go back to the OS, so RSS follows "
                         "what is alive (return_freed_memory); default: glibc's own thresholds",
                         ("return", "default"), parse_choices=True)
    timeout: float = option(600.0, "seconds one set of processes may take before failing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.bench memory", description=__doc__.split("\n")[0])
    args = parse_into(MemoryOptions, add_options(parser, MemoryOptions), argv)
    job = MemoryJob(64, 2, 16, 2) if args.quick else MemoryJob(args.width, args.depth, MemoryJob.global_batch,
                                                               args.steps)
    load = os.getloadavg()
    rows = measure(job, list(args.world_sizes), args.timeout, args.malloc)
    print(render(rows, job))
    print(f"load average (1, 5, 15 min) before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()) + f"; {os.cpu_count()} cores, torch {torch.__version__}, "
          f"gloo, 1 thread per rank, --malloc {args.malloc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
