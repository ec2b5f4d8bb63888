"""Data-parallel training under ``accelerate launch``: the same job as ``ddp_demo.train``.

    NPROC=2 launch/accelerate_cpu.sh [flags]     # N gloo processes on the CPU
    launch/accelerate_gpu.sh [flags]             # one process per GPU, nccl

Only two things differ from ddp_demo.train. Start-up: Accelerate reads the launcher's
environment and joins the process group (``Accelerator()``). Wrapping:
``Accelerator.prepare`` wraps the Module in ``DistributedDataParallel``, and
``accelerator.accumulate`` / ``accelerator.backward`` do what ``DDP.no_sync`` and
``loss / K`` do there. The flags, data, model, training loop, checks and output files
are ddp_demo.train's, so both write the same ``final.pt`` for the same seed, steps and
global batch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ddp_demo import train
from ddp_demo.core.accumulate import GradSync
from ddp_demo.core.config import ConfigError, TrainConfig
from ddp_demo.core.dist import DistContext, pick_backend, pick_device
from ddp_demo.core.env import LaunchEnv
from ddp_demo.core.loop import Wrapped


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """``cpu=True`` only for ``--device cpu``; under ``accelerate launch`` the launcher's
    ``ACCELERATE_USE_CPU=1`` does the same (launch/accelerate_cpu.sh sets it)."""
    init = {"timeout": timedelta(seconds=cfg.timeout)}
    if cfg.backend != "auto":
        init["backend"] = cfg.backend
    return Accelerator(cpu=cfg.device == "cpu", gradient_accumulation_steps=cfg.grad_accum_steps,
                       kwargs_handlers=[InitProcessGroupKwargs(**init)])


def context_of(accelerator: Accelerator) -> DistContext:
    """What Accelerate decided, in the form the shared code takes."""
    backend = accelerator.state.backend or pick_backend(accelerator.device)  # None: one process, no group
    # Accelerate names the CPU `cpu:0` under a multi-process launch; torch, torchrun's path and every
    # report say `cpu` (there is one CPU device), so the log lines read the same under both launchers.
    device = torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device
    return DistContext(accelerator.process_index, accelerator.local_process_index, accelerator.num_processes,
                       device, backend)


def check_processes(env: LaunchEnv, ctx: DistContext) -> None:
    """Refuse to run N copies that never sync.

    On a machine without CUDA, a plain ``Accelerator()`` under a multi-process launcher
    (``accelerate launch --multi_gpu``, torchrun) finds no GPU and falls back to "no
    distribution": every process believes it is alone, trains its own copy on its own
    shard and writes its own result, with no error anywhere (issue 3; measured with
    accelerate 1.15). The launcher's WORLD_SIZE says otherwise, so compare the two.
    """
    if env.world_size > 1 and ctx.world_size == 1:
        raise ConfigError(
            f"the launcher started {env.world_size} processes but Accelerate sees only one, so each would train "
            "its own copy without syncing; on a CPU machine set ACCELERATE_USE_CPU=1 (launch/accelerate_cpu.sh "
            "does) or pass --device cpu"
        )
    if ctx.world_size != env.world_size:  # e.g. mpirun, which sets no WORLD_SIZE: not supported here
        raise ConfigError(f"the launcher set WORLD_SIZE={env.world_size} but Accelerate sees {ctx.world_size} "
                          "processes; start ddp_demo.train_accelerate with accelerate launch --multi_gpu")


def accelerate_grad_sync(accelerator: Accelerator, model: torch.nn.Module, never_sync: bool = False) -> GradSync:
    """``accelerator.accumulate`` counts micro-batches and enters ``no_sync`` on all but every
    K-th; ``accelerator.backward`` divides the loss by K. ``never_sync``: the negative control."""

    @contextlib.contextmanager
    def context(is_last: bool) -> Iterator[None]:
        with accelerator.accumulate(model):
            # Accelerate keeps its own count; if it ever disagreed with the loop's, the
            # prepared optimizer would silently skip (or take) a step, so say so instead.
            if accelerator.sync_gradients != is_last:
                raise RuntimeError("accelerator.accumulate lost count of the micro-batches")
            with accelerator.no_sync(model) if never_sync else contextlib.nullcontext():
                yield

    return GradSync(context, accelerator.backward)


class AccelerateLauncher:
    """The two things ddp_demo.train does differently under ``accelerate launch`` (its
    :class:`~ddp_demo.train.Launcher`, in place of ``ProcessGroupLauncher``)."""

    name = "accelerate"  # summary.json's "launcher"
    accelerator: Accelerator | None = None

    def start(self, env: LaunchEnv, cfg: TrainConfig) -> DistContext:
        if cfg.ddp != "torch":
            raise ConfigError(f"--ddp {cfg.ddp} is for ddp_demo.train: under accelerate launch, Accelerate wraps the "
                              "model in torch's DDP; drop --ddp or launch ddp_demo.train with torchrun")
        if cfg.strategy != "ddp":
            raise ConfigError(f"--strategy {cfg.strategy} is for ddp_demo.train: Accelerate's own FSDP/ZeRO plugins "
                              "are not wired here; launch ddp_demo.train with torchrun, or drop --strategy")
        if cfg.sharded_checkpoints:
            raise ConfigError("--checkpoint-format sharded is for ddp_demo.train: Accelerate wraps the optimizer, "
                              "which torch.distributed.checkpoint's state_dict helpers do not map; drop the flag")
        pick_device(env.local_rank, cfg.device)  # --device cuda without CUDA: the same one line as torchrun's
        self.accelerator = make_accelerator(cfg)
        ctx = context_of(self.accelerator)
        check_processes(env, ctx)
        return ctx

    def wrap(self, model, optimizer, cfg: TrainConfig, ctx: DistContext) -> Wrapped:
        """DDP via ``Accelerator.prepare``. The DataLoader is *not* prepared: Accelerate would
        re-shard it, dealing whole batches round-robin and (``even_batches``) padding the
        last by repeating samples. The core's loader already gives each rank exactly the
        samples it gets under torchrun, which is what makes the two paths' results equal."""
        ddp, optimizer = self.accelerator.prepare(model, optimizer)
        return Wrapped(ddp, optimizer, accelerate_grad_sync(self.accelerator, ddp, never_sync=cfg.skip_grad_sync))

    def release(self) -> None:
        """Accelerate keeps the prepared model in ``accelerator._models``; let it go before
        the process group is destroyed (dist.teardown explains why the order matters)."""
        if self.accelerator is not None:
            self.accelerator.free_memory()


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, launcher=AccelerateLauncher())


if __name__ == "__main__":
    sys.exit(main())
