"""The equivalence checks, run inside ``accelerate launch`` instead of the spawn helper.

    ENTRY=ddp_demo.proof.accelerate_checks NPROC=2 launch/accelerate_cpu.sh --out DIR

Every rank builds the same cases as ``equivalence.py`` but lets Accelerate wrap the
Module (``Accelerator.prepare``) and run backward (``accelerator.backward``,
``accelerator.accumulate``), then writes what it got to ``DIR/rank{R}.pt``:

- ``world_size``, ``distributed_type`` and ``prepared_is_ddp``: did Accelerate really
  start a multi-process job and wrap the Module in ``DistributedDataParallel``?
- ``grads``: ``{(model, dtype): .grad}`` after one step on this rank's shard;
- ``accum``: ``{("accum", model, dtype, K): [.grad after each micro-batch]}``.

``tests/test_accelerate.py`` compares them with one process on the whole batch
(``equivalence.reference_grads``), judged as ``proof/cases.py`` judges (``core/tolerances.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.accumulate import accumulate_gradients
from ddp_demo.core.config import TrainConfig
from ddp_demo.core.dist import DistContext, teardown
from ddp_demo.core.env import launch_env
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.outputs import atomic_write
from ddp_demo.proof.cases import DTYPE_NAMES, accum_cases
from ddp_demo.proof.equivalence import case_setup, grads_of, recording, shard
from ddp_demo.train_accelerate import AccelerateLauncher, accelerate_grad_sync


def grads_case(accelerator: Accelerator, ctx: DistContext, model_name: str, dtype: str) -> dict:
    """One step of this rank's shard through the prepared model; its ``.grad``."""
    model, (batch,), loss_fn = case_setup(model_name, dtype, steps=1)
    prepared = accelerator.prepare(model)
    x, y = shard(batch, ctx)
    accelerator.gradient_accumulation_steps = 1  # accelerator.backward divides the loss by it
    accelerator.backward(loss_fn(prepared(x), y))
    return grads_of(model)


def accum_case(accelerator: Accelerator, ctx: DistContext, model_name: str, dtype: str, k: int) -> list[dict]:
    """One step accumulated over ``k`` micro-batches, exactly as the trainer does it under Accelerate."""
    model, (batch,), loss_fn = case_setup(model_name, dtype, steps=1)
    prepared = accelerator.prepare(model)
    accelerator.gradient_accumulation_steps, accelerator.step = k, 0  # a fresh count for each case
    snapshots: list = []
    sync = recording(accelerate_grad_sync(accelerator, prepared), model, snapshots)
    accumulate_gradients(prepared, *shard(batch, ctx), loss_fn, k, sync)
    return snapshots


def run_checks(accelerator: Accelerator, ctx: DistContext) -> dict:
    probe = accelerator.prepare(torch.nn.Linear(2, 2))  # what prepare() makes of a Module in this job
    return {
        "world_size": ctx.world_size,
        "distributed_type": accelerator.distributed_type.value,
        "prepared_is_ddp": isinstance(probe, DDP),
        "grads": {(m, d): grads_case(accelerator, ctx, m, d) for m in MODEL_NAMES for d in DTYPE_NAMES},
        "accum": {case: accum_case(accelerator, ctx, *case) for case in accum_cases(ctx.world_size)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp_demo.proof.accelerate_checks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank{R}.pt")
    args = parser.parse_args(argv)
    launcher = AccelerateLauncher()
    try:
        ctx = launcher.start(launch_env(), TrainConfig())
        results = run_checks(launcher.accelerator, ctx)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.out) / f"rank{ctx.rank}.pt", lambda p: torch.save(results, p))
    finally:
        launcher.release()
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
