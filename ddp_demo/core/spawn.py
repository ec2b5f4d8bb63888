"""Run a function on N processes joined by a FileStore (no ports), with a timeout.

The test suite uses this to run the multi-process bodies in ``equivalence.py``;
you can too::

    from ddp_demo.core.spawn import run_on_ranks
    results = run_on_ranks(my_fn, world_size=2, args=(...,))   # my_fn(ctx, *args)

Each worker goes through the same ``setup()``/``teardown()`` as the trainer. A
worker that raises, exits non-zero (an abort at exit included) or outlives the
timeout fails the whole call, with every rank's error attached.

The workers are forked from a server process (multiprocessing's ``forkserver``) that
has imported torch once, so a call does not pay for N more imports. Importing torch
and ``torch._dynamo`` (which every optimizer's constructor imports) costs about 3.5 s
of CPU per process here: on 2 cores a group of 4 took 9 s to start by ``spawn`` and
0.9 s forked from the warm server. The server starts with the first call, in the
caller's environment and working directory, and serves every later call; it has run no
tensor op and no thread pool, which is what makes forking it safe. ``start_method="spawn"``
gives fresh interpreters (the benchmark's timings use them).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ddp_demo.core.dist import setup, teardown
from ddp_demo.core.env import LaunchEnv


class WorkerError(RuntimeError):
    pass


def _worker(fn, rank: int, world_size: int, store_path: str, timeout: float, args: tuple, results,
            device: str = "cpu", backend: str = "auto") -> None:
    # One thread per rank: N ranks share the cores, as torchrun's OMP_NUM_THREADS=1 does.
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    # The backend follows the device: gloo on the CPU (the default here), nccl on CUDA.
    ctx = setup(LaunchEnv(rank, rank, world_size), device=device, backend=backend, timeout_s=timeout, store=store)
    try:
        out = fn(ctx, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # tensors travel as bytes: no shared-memory handles outlive the worker
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        del store
        teardown()


# What the fork server imports before serving: torch, the optimizers' torch._dynamo, the
# process group and the strategies (FSDP2's DTensor; ZeroRedundancyOptimizer is left to the
# ranks that run zero, as in the trainer).
PRELOAD = ["torch._dynamo", "ddp_demo.core.spawn", "ddp_demo.parallel.strategy"]


def forkserver(module: str = "__main__", preload: tuple[str, ...] = ()) -> mp.context.BaseContext:
    """multiprocessing's forkserver context, its server to import ``PRELOAD``, ``preload`` and ``module``.

    Only the list given before the server's first fork counts (it starts once per process);
    a script's ``__main__`` is left to the workers, which import it by path."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, *preload] + ([module] if module != "__main__" else []))
    return context


def run_on_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 120.0,
                 device: str = "cpu", backend: str = "auto", start_method: str = "forkserver",
                 give_up: Callable[[], bool] | None = None, preload: tuple[str, ...] = ()) -> list[Any]:
    """Return ``[fn(ctx_0, *args), ..., fn(ctx_{N-1}, *args)]`` computed on N processes.

    ``device``: ``cpu`` (gloo), ``cuda`` (rank r on ``cuda:r``, nccl) or ``auto``; ``backend``
    overrides (gloo lets two ranks share one GPU, which nccl refuses). ``start_method``:
    ``forkserver`` (module docstring) or ``spawn``. ``give_up()``, asked every half second, stops
    every process before the timeout (the check: a rank raised and another waits). ``preload``:
    more modules for the fork server to import once, if this call starts it."""
    if start_method == "forkserver" and "forkserver" not in mp.get_all_start_methods():
        start_method = "spawn"  # Windows has no fork
    spawn = forkserver(fn.__module__, preload) if start_method == "forkserver" else mp.get_context(start_method)
    results = spawn.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            spawn.Process(target=_worker, args=(fn, r, world_size, store_path, timeout, args, results, device, backend),
                          daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        outputs: dict[int, tuple[bool, Any]] = {}
        gave_up = False
        try:
            while len(outputs) < world_size and time.monotonic() < deadline:
                try:
                    rank, ok, payload = results.get(timeout=0.5)
                    outputs[rank] = (ok, payload)
                except queue.Empty:
                    if all(p.exitcode is not None for p in procs):
                        break  # everyone has exited and flushed: nothing more can arrive
                    if give_up is not None and give_up():
                        gave_up = True  # a rank is stuck for good: the finally below kills it now
                        break
            for p in procs:
                p.join(timeout=1.0 if gave_up else max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [f"rank {r}:\n{payload}" for r, (ok, payload) in sorted(outputs.items()) if not ok]
    errors += [f"rank {r}: exit code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0]
    missing = [r for r in range(world_size) if r not in outputs]
    if missing:
        errors.append(f"ranks {missing} returned nothing within {timeout:.0f} s")
    if errors:
        raise WorkerError("\n".join(errors))
    return [torch.load(io.BytesIO(outputs[r][1]), weights_only=False) for r in range(world_size)]

