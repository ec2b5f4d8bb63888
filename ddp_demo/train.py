"""Data-parallel training under torchrun.

    torchrun --standalone --nproc_per_node=2 -m ddp_demo.train [flags]
    python -m ddp_demo.train [flags]            # one process, same result

Every rank builds the same Module from the same seed, wraps it in
``DistributedDataParallel`` and trains on its own ``B / N`` samples per step; DDP
all-reduces (averages) the gradients during ``backward()``, so every rank applies
the same update and the run equals a single process training on the full batch.
"""

from __future__ import annotations

import sys
import time
import traceback

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import log
from .config import ConfigError, TrainConfig, parse_config
from .data import Task, builtin_task, heldout_counts, load_task, rank_loader
from .dist import DistContext, LaunchEnv, all_ranks_equal, launch_env, setup, teardown
from .doctor import LaunchProblem, preflight
from .models import build_model
from .outputs import check_out_dir, write_outputs
from .training import DTYPES, loss_function, make_optimizer, train_loop


class ParametersDiverged(RuntimeError):
    """The ranks disagree at the end: the run is not a data-parallel run of one model."""


def make_task(cfg: TrainConfig) -> Task:
    dtype = DTYPES[cfg.dtype]
    if cfg.data:
        return load_task(cfg.data, cfg.model, dtype, cfg.seed)
    return builtin_task(cfg.model, cfg.seed, dtype)


def make_model(cfg: TrainConfig, task: Task, device: torch.device) -> torch.nn.Module:
    """The same seed on every rank gives the same initial weights (DDP also
    broadcasts rank 0's at construction); seeding makes runs repeatable across N."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, task.x_shape, task.num_classes).to(device=device, dtype=DTYPES[cfg.dtype])


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP on a process group; the bare module when there is no group (plain python)."""
    if not ctx.distributed:
        return model
    return DDP(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(cfg: TrainConfig, task: Task, ctx: DistContext) -> dict:
    """Train, verify the ranks agree, write the outputs; returns the summary."""
    start = time.perf_counter()
    model = make_model(cfg, task, ctx.device)
    ddp = wrap(model, ctx)
    optimizer = make_optimizer(cfg, ddp.parameters())
    loader = rank_loader(task.train, ctx, cfg.global_batch_size, cfg.seed)
    log.info(ctx.rank, f"training {cfg.model} on {ctx.world_size} process(es), device {ctx.device}, "
                       f"backend {ctx.backend}, {cfg.global_batch_size // ctx.world_size} samples per rank per step")
    log.each(ctx.rank, f"device {ctx.device}, local rank {ctx.local_rank}", cfg.log_all_ranks)
    logs = train_loop(ddp, optimizer, loader, loss_function(task), cfg, ctx)

    identical = all_ranks_equal(flat_parameters(model), ctx)
    if identical:
        log.info(ctx.rank, f"all {ctx.world_size} rank(s) hold bit-identical parameters")
    correct, total = heldout_counts(model, task, ctx)
    summary = {
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": ctx.device.type,
        "torch_version": torch.__version__,
        "final_loss": logs[-1].loss,
        "heldout_accuracy": correct / total,
        "heldout_samples": total,
        "params_identical_across_ranks": identical,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    if ctx.is_main:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # no "module." prefix
        write_outputs(cfg.out, state, [vars(s) for s in logs], summary)
    log.info(ctx.rank, f"held-out accuracy {correct}/{total} = {correct / total:.3f}; "
                       f"final loss {logs[-1].loss:.4f}; wall time {summary['wall_time_s']:.1f} s; wrote {cfg.out}/")
    if not identical:
        raise ParametersDiverged(
            "ranks hold different parameters after training: gradients were not synchronised"
            + (" (--skip-grad-sync was given)" if cfg.skip_grad_sync else "")
        )
    return summary


def prepare(argv: list[str] | None, env: LaunchEnv) -> tuple[TrainConfig, Task]:
    """Everything that can reject the input, done before any process group or file exists."""
    cfg = parse_config(argv)
    if cfg.preflight:  # before the batch check: a wrong world size is the launch's fault, not the batch's
        passed = preflight(env.launched, env.world_size, cfg.device, cfg.backend)
        log.info(env.rank, f"preflight: {passed} launch checks passed")
    cfg.check_world_size(env.world_size)
    check_out_dir(cfg.out)
    return cfg, make_task(cfg)


def main(argv: list[str] | None = None) -> int:
    env = launch_env()
    try:
        cfg, task = prepare(argv, env)
        ctx = setup(env, cfg.device, cfg.backend, cfg.timeout)
    except LaunchProblem as e:  # a node's own setup: each node's first process says it, once per node
        log.error(env.local_rank, str(e))
        return 2
    except (ConfigError, RuntimeError) as e:
        log.error(env.rank, str(e))
        return 2
    try:
        run(cfg, task, ctx)
        return 0
    except ParametersDiverged as e:
        log.error(ctx.rank, str(e))
        return 1
    except Exception as e:
        # Print it from the rank it happened on, then drop the traceback's frames so the
        # DDP model they hold is freed before teardown (see dist.teardown for why).
        print(f"[rank {ctx.rank}] " + "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
        traceback.clear_frames(e.__traceback__)
        return 1
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
