"""What data parallelism costs here: ``python -m ddp_demo.bench [--out DIR] [--quick]``.

Measures, on this machine (CPU + gloo, or CUDA + nccl where GPUs exist):

1. weak scaling: samples/s at N = 2 and 4 processes against N = 1 (rank 0 alone, measured
   interleaved in the same job) at the same per-rank batch, for the trainer's CNN job
   (compute-bound) and a 3.2M-parameter MLP (communication-heavy);
2. where the time goes at N = 2: the bare step, the DDP step, and the bare step plus one
   raw ``all_reduce`` of all gradients in one flat buffer; gloo's bus bandwidth;
3. DDP's knobs (``bucket_cap_mb``, ``gradient_as_bucket_view``, ``static_graph``,
   ``no_sync`` accumulation) with each one's peak memory per rank;
4. wrapper overhead: DDP at N = 1 vs the bare module, accelerate vs torchrun on one job;
5. ddp_demo's own DDP (``parallel/ddp.py``) beside torch's and the raw all-reduce at N = 2;

and writes ``results.json``, ``results.md`` and ``bench.png`` under ``--out``. One
process group per world size does all of that size's work (``bench.ranks``); the
launcher comparison runs the real commands (``bench.launchers``). The full run takes
a few minutes on a 2-core machine; ``--quick`` checks the whole pipeline in seconds
on tiny models, and its numbers mean nothing.

``python -m ddp_demo.bench memory`` measures something else: what one rank holds under ddp,
zero and fsdp (``bench/memory.py``); ``checkpoint``, what a sharded checkpoint costs to save
and load at N = 1, 2, 4 (``bench/checkpoint_io.py``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ddp_demo.bench import command, launchers, report
from ddp_demo.bench.ranks import RAW, STOCK, TUNED, suite_on_rank
from ddp_demo.bench.timing import Reps, Variant, Workload
from ddp_demo.core.flags import add_options, option, parse_into
from ddp_demo.core.malloc import MALLOC_CHOICES
from ddp_demo.core.spawn import run_on_ranks

VARIANTS = [
    RAW,  # the floor for a sync not overlapped with backward
    STOCK,  # bucket_cap_mb = 25 is DDP's default
    Variant("bucket_cap_mb=1", ddp={"bucket_cap_mb": 1}),
    Variant("bucket_cap_mb=5", ddp={"bucket_cap_mb": 5}),
    Variant("bucket_cap_mb=100", ddp={"bucket_cap_mb": 100}),
    Variant("gradient_as_bucket_view", ddp={"gradient_as_bucket_view": True}),
    Variant("static_graph", ddp={"static_graph": True}),
    Variant("all three = DDP tuned", ddp=TUNED.ddp),
    Variant("no_sync, sync every 2", ddp={}, accumulate=2),
    Variant("no_sync, sync every 4", ddp={}, accumulate=4),
]


@dataclass(frozen=True)
class BenchPlan:
    """Everything one run measures; ``--quick`` shrinks every size, never the pipeline."""

    world_sizes: tuple[int, ...]
    workloads: list[Workload]  # weak scaling, at every N
    knobs_workload: Workload  # where the time goes and DDP's knobs, at N = 2
    scratch_workloads: list[Workload]  # ddp_demo's ScratchDDP beside torch's DDP, at N = 2
    busbw_mb: list[float]
    reps: Reps
    launcher_steps: int  # optimizer steps per launch in the accelerate vs torchrun comparison
    launches: int  # launches per launcher, alternated
    trainer_steps: int  # steps per epoch (= per repetition) of the trainer vs bare-loop comparison, at N = 2
    # Its repetitions: more than the rest, as a gloo all-reduce here takes 0.2 or 1.8 ms by chance, which moves
    # a 64-step epoch of the 2 ms MLP step by more than the 2% the comparison is about.
    trainer_reps: int
    malloc: str = "keep"  # as the trainer's --malloc: keep freed memory (core/malloc.py), or glibc's default
    trainer_models: tuple[str, ...] = ("mlp", "cnn")
    command_jobs: dict = field(default_factory=lambda: {"default": [], "cnn": ["--model", "cnn"]})  # trainer flags
    variants: list[Variant] = field(default_factory=lambda: VARIANTS)


def make_plan(quick: bool, launchers: bool, malloc: str = "keep") -> BenchPlan:
    if quick:
        mlp = Workload("mlp", "mlp", 8, 2, mlp_width=64, mlp_depth=2)
        cnn = Workload("cnn", "cnn", 8, 2)
        return BenchPlan((2,), [cnn, mlp], mlp, [cnn, mlp], [4e-6, 0.25, 1.0], Reps(warmup=1, reps=2),
                    launcher_steps=12, launches=int(launchers), trainer_steps=4, trainer_reps=2, malloc=malloc,
                    command_jobs={"default": ["--steps", "12"]})
    # CNN: the trainer's default job at N = 2 (global batch 64 = 32 per rank), and the same
    # model with 4x the batch: 4x the compute per all-reduce. MLP: 3 x 1024 hidden, 3.16M
    # parameters = 12.6 MB of float32 gradients to all-reduce every step.
    mlp, cnn = Workload("mlp", "mlp", 32, 6), Workload("cnn", "cnn", 32, 20)
    return BenchPlan((2, 4), [cnn, Workload("cnn, batch 128", "cnn", 128, 5), mlp], mlp, [cnn, mlp],
                # 4 B and 16 KB (about the CNN's 14 KB of gradients): latency; 1-64 MB: bandwidth
                [4e-6, 0.016384, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], Reps(warmup=3, reps=7),
                launcher_steps=220, launches=3 * int(launchers), trainer_steps=64, trainer_reps=41,  # 64: an epoch
                malloc=malloc)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(device: str) -> dict:
    """Recorded with every result: numbers mean little without the machine they came from."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    cuda = device == "cuda"
    return {"cpu": cpu, "cores": cores(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "backend": "nccl" if cuda else "gloo",
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "threads_per_rank": 1, "load_average_before": list(os.getloadavg())}


class OtherLoad:
    """The share of the machine's CPU that *other* processes used while the benchmark ran.

    Other jobs on a shared machine distort timings, so the report says how much there was:
    the machine's busy time (``/proc/stat``) minus this process's and its children's
    (``getrusage``; the workers and launched jobs are all waited for, so they count).
    """

    def __init__(self):
        self.start = (self.machine_busy_s(), self.own_s(), time.perf_counter())

    @staticmethod
    def machine_busy_s() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait; the rest (user, nice, system, irq, ..., steal) is busy
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own_s() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def share(self) -> float | None:
        busy0, own0, t0 = self.start
        busy = self.machine_busy_s()
        if busy is None or busy0 is None:
            return None
        others = (busy - busy0) - (self.own_s() - own0)
        return round(max(0.0, others) / ((time.perf_counter() - t0) * cores()), 3)


class ProgressBar:
    """A tqdm bar in this (the parent) process, moved by labels rank 0 puts on a queue."""

    def __init__(self, total: int):
        self.queue = mp.get_context("spawn").Queue()  # passed to the workers when they start
        self.bar = tqdm(total=total, unit="part", dynamic_ncols=True, file=sys.stderr)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            try:
                label = self.queue.get(timeout=0.2)
            except Exception:  # queue.Empty; nothing arrived in this slice
                continue
            self.bar.set_postfix_str(label)
            self.bar.update()

    def step(self, label: str) -> None:
        self.queue.put(label)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.bar.close()


def units(plan: BenchPlan) -> int:
    """How many progress labels the run will produce."""
    per_n = len(plan.workloads)
    return (per_n * len(plan.world_sizes) + len(plan.busbw_mb) + len(plan.variants) + len(plan.scratch_workloads)
            + len(plan.trainer_models) + 2 * plan.launches
            + len(plan.command_jobs) * len(command.allocators()) * plan.launches)


def measure(plan: BenchPlan, device: str, timeout: float, bar: ProgressBar) -> dict:
    """One process group per world size; N = 2 also measures bandwidth and the knobs."""
    results: dict = {"weak_scaling": {}}
    for n in plan.world_sizes:
        tasks: dict = {"weak": plan.workloads, "malloc": plan.malloc}
        if n == 2:
            tasks |= {"busbw": plan.busbw_mb, "knobs": (plan.knobs_workload, plan.variants),
                      "scratch": plan.scratch_workloads, "trainer": (list(plan.trainer_models), plan.trainer_steps,
                                                                       plan.trainer_reps)}
        bar.bar.set_description(f"N={n}{' (oversubscribed)' if n > cores() else ''}")
        per_rank = run_on_ranks(suite_on_rank, n, (tasks, plan.reps, bar.queue), timeout=timeout, device=device,
                                start_method="spawn")  # timings from fresh interpreters
        results["weak_scaling"][str(n)] = per_rank[0]["weak_scaling"]  # times are already the slowest rank's
        results["malloc_keeps_freed_memory"] = all(r["malloc_keeps_freed_memory"] for r in per_rank)
        if n == 2:
            results["busbw"] = per_rank[0]["busbw"]
            results["knobs"] = merge_memory(per_rank)
            results["scratch"] = per_rank[0]["scratch"]
            results["trainer"] = per_rank[0]["trainer"]  # times are already the slowest rank's
    return results


def merge_memory(per_rank: list[dict]) -> dict:
    """Times are equal on every rank (slowest rank's); memory is per rank: keep each rank's."""
    knobs = per_rank[0]["knobs"]
    for i, row in enumerate(knobs["rows"]):
        for key in ("rss_base_mb", "rss_peak_mb"):
            row[key] = [r["knobs"]["rows"][i][key] for r in per_rank]
    knobs["check"] = {key: max(r["knobs"]["check"][key] for r in per_rank) for key in knobs["check"]}
    return knobs


@dataclass(frozen=True)
class BenchOptions:
    out: str = option("runs/bench", "directory for results.json, results.md and bench.png")
    quick: bool = option(False, "tiny models, 2 repetitions: checks the pipeline, measures nothing")
    launchers: bool = option(True, "skip the accelerate vs torchrun comparison (it starts 6 real jobs)")
    malloc: str = option("keep", "as ddp_demo.train's --malloc, in every process: keep freed memory for reuse (the "
                         "default), or glibc's default, which gives it back and page-faults it in again",
                         MALLOC_CHOICES, parse_choices=True)
    device: str = option("auto", "cuda (nccl) when available, else cpu (gloo)", ("auto", "cpu", "cuda"),
                         parse_choices=True)
    timeout: float = option(600.0, "seconds one process group may take before failing")


def parse_args(argv: list[str] | None) -> BenchOptions:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.bench", description=__doc__.split("\n\n")[0])
    return parse_into(BenchOptions, add_options(parser, BenchOptions), argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:  # ddp, zero and fsdp side by side: what a rank holds (bench/memory.py)
        from ddp_demo.bench.memory import main as memory

        return memory(argv[1:])
    if argv[:1] == ["param-peak"]:  # parameter bytes alive during a step: DDP, FSDP2, ScratchFSDP (bench/param_peak.py)
        from ddp_demo.bench.param_peak import main as param_peak

        return param_peak(argv[1:])
    if argv[:1] == ["checkpoint"]:  # sharded checkpoints: save/load time, bytes per rank (bench/checkpoint_io.py)
        from ddp_demo.bench.checkpoint_io import main as checkpoint_io

        return checkpoint_io(argv[1:])
    args = parse_args(argv)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    plan = make_plan(args.quick, args.launchers, args.malloc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"machine": machine_info(device), "quick": args.quick, "plan": asdict(plan)}
    others = OtherLoad()
    bar = ProgressBar(units(plan))
    try:
        results |= measure(plan, device, args.timeout, bar)
        if plan.launches:
            bar.bar.set_description("launchers")
            results["launchers"] = launchers.compare(plan.launcher_steps, plan.launches, device, bar,
                                                           malloc=plan.malloc)
            bar.bar.set_description("whole command")
            results["command"] = command.compare(plan.command_jobs, command.allocators(), plan.launches, bar)
    finally:
        bar.close()
    results["machine"]["load_average_after"] = list(os.getloadavg())
    results["machine"]["cpu_share_used_by_others"] = others.share()
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    results["summary"] = report.summarize(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, out)
    from ddp_demo.bench.plot import plot  # matplotlib is imported only here

    plot(results, out / "bench.png")
    print(report.headline(results))
    print(f"wrote {out}/results.json, results.md, bench.png in {results['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
