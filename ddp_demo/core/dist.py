"""The process group: joined by ``setup()`` from what the launcher said, left by ``teardown()``.

core/env.py reads the launcher's environment into a :class:`LaunchEnv` (torchrun's ``RANK`` /
``LOCAL_RANK`` / ``WORLD_SIZE``, or srun's); ``setup()`` adds the device and backend and joins
the process group; ``teardown()`` leaves it. Everything else receives a :class:`DistContext`
explicitly: no other module calls ``init_process_group`` (tests/test_launch_env.py).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp_demo.core import env as launch

# Re-exported: the launcher's environment was read here before core/env.py (issue 26) took it over.
from ddp_demo.core.env import RAY_RESTARTS, SLURM_PORT_BASE, LaunchEnv, launch_env, launch_variables  # noqa: F401


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; passed down to whoever needs it."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists (torchrun, even with N = 1); plain ``python`` has none."""
        return dist.is_initialized()


def attempt_store(env: LaunchEnv, timeout_s: float) -> dist.Store:
    """The launcher's key-value store, seen through a prefix unique to this restart attempt.

    torchrun's agent keeps one TCPStore for the whole job. After an elastic restart the
    new workers would find the dead workers' keys (gloo's peer addresses) under the same
    names and may connect to them, failing or hanging (the issue that asked for this
    measured 4 restarts in 10). A per-attempt prefix gives every attempt a clean
    namespace; ``launch/soak_restart.sh`` measures both ways (docs/resilience.md).

    A store that rank 0 hosts itself (no agent store: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``,
    as launch/multinode.sh sets) is new every attempt and needs no prefix. It must not get one
    either: each node's agent counts its own restarts, so after a membership change the nodes'
    counts differ (pytorch/pytorch#135712) and the workers would look for each other under
    different names.
    """
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        world_size=env.world_size,
        is_master=env.rank == 0 and not env.agent_store,  # without an agent, rank 0 hosts it
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    if not env.agent_store:
        return store
    attempt = env.restart_count if env.attempt_prefix else 0
    return dist.PrefixStore(f"ddp_demo/attempt-{attempt}/", store)


def after_one_spoke(env: LaunchEnv, speaker: int, wait_s: float = 10.0) -> None:
    """Bad input is reported by one rank, ``speaker`` (core/log.py), and every rank then exits
    with code 2. But torchrun's agent stops every other worker as soon as one has exited: a
    silent rank that got there first would kill the speaker before it had printed, leaving a
    failed job and no reason (seen in the suite: tests/test_doctor.py's preflight case). So the
    speaker, once it has printed, sets a key in the agent's store, and the silent ranks wait
    for that key (at most ``wait_s``) before they exit. Only where torchrun's agent hosts the
    store (the default): elsewhere there is no store that outlives the speaker to wait on.
    """
    if not (env.launched and env.agent_store):
        return
    key = f"spoke/{speaker}"
    try:
        store = attempt_store(env, wait_s)
        if env.rank == speaker:
            store.set(key, "1")
        else:
            store.wait([key], timedelta(seconds=wait_s))
    except RuntimeError:  # torch.distributed.DistError: no store to reach, or the speaker never got there: exit anyway
        pass


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (or asked for), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend follows the device: nccl for CUDA tensors, gloo for CPU tensors."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def setup(
    env: LaunchEnv,
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 120.0,
    store: dist.Store | None = None,
) -> DistContext:
    """Join the process group (when there is more than one process) and return the context.

    ``store`` lets tests pass a ``FileStore`` instead of torchrun's ``MASTER_ADDR``/``PORT``.
    """
    dev = pick_device(env.local_rank, device)
    be = pick_backend(dev, backend)
    if env.threads is not None:  # as torchrun does for its workers (core/env.py says when)
        launch.export_threads(env.threads)  # for any process this one starts
        torch.set_num_threads(env.threads)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.launched or env.world_size > 1 or store is not None:
        if store is None:
            store = attempt_store(env, timeout_s)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            be,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            store=store,
            **kwargs,
        )
    return DistContext(env.rank, env.local_rank, env.world_size, dev, be)


def teardown() -> None:
    """Leave the process group while the interpreter is still fully alive.

    Why this matters (measured: without it ~1 launch in 4 aborts with "terminate
    called without an active exception" after all work is done): during
    ``backward()`` torch stashes a Python ``contextvars.Context`` in thread-local
    state (``torch/autograd/graph.py``, ``_engine_run_backward``). Every gloo
    collective DDP launches from backward captures that state, so the work object
    holds a Python reference. gloo's worker thread destroys finished work objects
    itself, which needs the GIL. If the main thread has already entered
    ``Py_FinalizeEx``, CPython makes that thread exit from inside a ``noexcept``
    destructor and the C++ runtime calls ``std::terminate``.

    The fix is ordering, not retries: by the time this runs the caller has dropped
    its DDP model, ``gc.collect()`` frees it and its reducer (they sit in reference
    cycles, so dropping the last name is not enough), and only then is the process
    group destroyed, while Python can still hand gloo's threads the GIL.
    tests/test_root_causes.py checks that order with the automatic collector off.
    (Measured on torch 2.13: once DDP has used it, the process group object outlives
    ``destroy_process_group`` and gloo's threads stay alive until the process exits.)
    Plain ``python`` has no process group and nothing to leave.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def all_ranks_equal(tensor: torch.Tensor, ctx: DistContext) -> bool:
    """True when every rank holds a bit-identical ``tensor`` (compared to rank 0's)."""
    if not dist.is_initialized():
        return True
    reference = tensor.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0 if torch.equal(reference, tensor) else 1], device=ctx.device)
    dist.all_reduce(mismatch)
    return int(mismatch.item()) == 0


def all_reduce_sum(values: list[float], ctx: DistContext, dtype=torch.float64) -> list[float]:
    """Sum a few scalars over all ranks (identity on one process)."""
    t = torch.tensor(values, dtype=dtype, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()
