"""How the benchmark measures: the jobs, the step variants, the clock and peak memory.

``bench.ranks`` runs these inside each worker process; ``bench.run`` decides what runs
where; ``bench.report`` writes the results up and ``bench.plot`` draws them.

Every time is measured the same way:

- warm-up steps first: allocations, optimizer state, DDP's bucket rebuild after its
  first iteration (DDP docs, "Internal Design") are all done before timing starts;
- then ``reps`` repetitions of ``steps`` steps each, every one started by a barrier so
  the ranks run side by side, as they do in training;
- variants that are compared (bare step vs DDP step) are *interleaved* repetition by
  repetition, so a burst of background load hits both alike;
- a repetition's time is the slowest rank's: a job moves at its slowest rank's pace.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.data import builtin_task
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import build_model
from ddp_demo.parallel.ddp import ScratchDDP

MB = 1_000_000  # decimal units throughout: MB and GB/s


@dataclass(frozen=True)
class Workload:
    """One benchmark job: a model and how many samples each rank takes per step."""

    label: str  # how the report names it
    model: str  # "cnn": the trainer's CNN job; "mlp": a wide MLP, gradients of several MB
    batch: int  # samples per rank per step (weak scaling: the same at every N)
    steps: int  # steps per timed repetition
    mlp_width: int = 1024
    mlp_depth: int = 3  # hidden layers: several layers give DDP several buckets to overlap


@dataclass(frozen=True)
class Reps:
    warmup: int  # untimed steps before the first repetition
    reps: int  # timed repetitions (medians and min-max are taken over these)


@dataclass(frozen=True)
class Variant:
    """How a step syncs gradients: a DDP configuration, or the hand-written flat all-reduce."""

    name: str
    ddp: dict | None = None  # DistributedDataParallel keyword arguments; None: no DDP
    scratch: bool = False  # wrap with ddp_demo's own ScratchDDP (parallel/ddp.py) instead of torch's DDP
    flat_all_reduce: bool = False  # bare module + one all_reduce of all gradients in one buffer
    accumulate: int = 1  # micro-batches per optimizer step; DDP syncs only the last (no_sync)


def build_workload(w: Workload, ctx: DistContext) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (identical on every rank: seed 0) and this rank's fixed batch."""
    torch.manual_seed(0)
    if w.model == "cnn":
        task = builtin_task("cnn", seed=1000 + ctx.rank, dtype=torch.float32, n_train=w.batch, n_heldout=1)
        x, y = task.train.tensors
        model = build_model("cnn", task.x_shape, task.num_classes)
    else:
        layers: list[nn.Module] = []
        for _ in range(w.mlp_depth):
            layers += [nn.Linear(w.mlp_width, w.mlp_width), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(w.mlp_width, 10))
        g = torch.Generator().manual_seed(1000 + ctx.rank)
        x, y = torch.randn(w.batch, w.mlp_width, generator=g), torch.randint(0, 10, (w.batch,), generator=g)
    return model.to(ctx.device), x.to(ctx.device), y.to(ctx.device)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FlatGrads:
    """Every ``.grad`` a view into one flat buffer, so a single ``all_reduce`` syncs them all.

    This is the floor for a sync that is *not* overlapped with backward: one collective,
    no bucket copies (DDP's ``gradient_as_bucket_view`` uses the same trick per bucket).
    Backward adds into an existing ``.grad`` in place, so the views stay put; ``check``
    proves it, because if autograd ever swapped in new tensors the all-reduce would sync
    a buffer nobody reads.
    """

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.flat = torch.zeros(param_count(model), device=self.params[0].device)
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def all_reduce(self, world_size: int) -> None:
        dist.all_reduce(self.flat)
        self.flat.div_(world_size)  # DDP averages too

    def check(self) -> None:
        base = self.flat.data_ptr()
        offsets = [p.grad.data_ptr() - base for p in self.params]
        expected = [sum(q.numel() for q in self.params[:i]) * self.flat.element_size() for i in range(len(offsets))]
        if offsets != expected:
            raise RuntimeError("backward replaced the flat gradient views; the raw all-reduce would be wrong")


class Step:
    """One optimizer step of variant ``v``: ``v.accumulate`` forward/backward passes, then SGD.

    lr = 0 on purpose: SGD with momentum still does all its arithmetic, but the weights
    stay put, so every repetition does exactly the same work (no drift towards zero
    gradients or denormal numbers, which are slow on CPUs). It also leaves the last
    step's gradients in ``.grad`` for :func:`gradients` to compare.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: Variant, ctx: DistContext,
                 group: dist.ProcessGroup | None = None):
        self.model = copy.deepcopy(model)
        if v.ddp is not None:
            wrapper = ScratchDDP if v.scratch else DDP
            self.model = wrapper(self.model, process_group=group, **v.ddp)  # group None: all ranks
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=0.9)
        self.flat = FlatGrads(self.model) if v.flat_all_reduce else None
        self.x, self.y, self.v, self.world_size = x, y, v, ctx.world_size

    def __call__(self) -> None:
        if self.flat is not None:
            self.flat.flat.zero_()  # keep the views (set_to_none would drop them)
        else:
            self.opt.zero_grad(set_to_none=True)
        for i in range(self.v.accumulate):
            # DDP skips its all-reduce inside no_sync, which must be entered before forward (DDP docs, no_sync).
            syncs = i == self.v.accumulate - 1 or self.v.ddp is None
            with contextlib.nullcontext() if syncs else self.model.no_sync():
                F.cross_entropy(self.model(self.x), self.y).backward()
        if self.flat is not None:
            self.flat.all_reduce(self.world_size)
        self.opt.step()

    def gradients(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])


def ddp_buckets_mb(model: nn.Module) -> list[float] | None:
    """The sizes of DDP's gradient buckets, in the order they are all-reduced, after DDP has
    rebuilt them to match the order gradients became ready in the first backward. DDP's own
    logging data holds them; it is a private API, so a torch without it just gets None."""
    try:
        data = model._get_ddp_logging_data()
    except AttributeError:
        return None
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes")
    return [int(b) / MB for b in str(sizes).split(",")] if sizes else None


def _sync_device(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)  # CUDA runs asynchronously: wait before reading the clock


def timed(fn: Callable, n: int, ctx: DistContext) -> float:
    """Seconds per call of ``fn`` over ``n`` calls, all ranks starting together."""
    if dist.is_initialized():
        dist.barrier()
    _sync_device(ctx)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync_device(ctx)
    return (time.perf_counter() - start) / n


def warm_up(fns: dict[str, Callable], r: Reps) -> None:
    for fn in fns.values():
        for _ in range(r.warmup):
            fn()
        if getattr(fn, "flat", None) is not None:
            fn.flat.check()  # the views survived backward: the raw all-reduce syncs the real gradients


def interleaved(fns: dict[str, Callable], steps: dict[str, int], r: Reps, ctx: DistContext) -> dict[str, list[float]]:
    """Per-step seconds of each function, ``r.reps`` repetitions, interleaved A B A B ..."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(r.reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, steps[name], ctx))
    return slowest_rank(times, ctx)


def slowest_rank(times: dict[str, list[float]], ctx: DistContext) -> dict[str, list[float]]:
    """Each repetition's time on the slowest rank (one MAX all-reduce, outside the timed parts)."""
    if not dist.is_initialized():
        return times
    t = torch.tensor(list(times.values()), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {name: row for name, row in zip(times, t.tolist(), strict=True)}


# ---- memory --------------------------------------------------------------------------------

def minor_faults_per_call(fn: Callable, n: int) -> float:
    """Page faults (minor: no disk involved) of this process per call of ``fn``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Start a new peak-RSS window; returns the RSS now (MiB), the baseline for this window.

    Writing 5 to ``/proc/self/clear_refs`` resets the kernel's high-water mark VmHWM
    (proc(5), Linux >= 4.0). ``malloc_trim`` first hands freed heap pages back to the
    OS, so memory left over from the previous variant is not counted against the next.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    return _status_mb("VmHWM")


def progress(queue, ctx: DistContext, label: str) -> None:
    """Tell the parent's progress bar that one unit of work is done (rank 0 speaks for all)."""
    if queue is not None and ctx.is_main:
        queue.put(label)
