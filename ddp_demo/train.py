"""Data-parallel training under torchrun.

    torchrun --standalone --nproc_per_node=2 -m ddp_demo.train [flags]
    python -m ddp_demo.train [flags]            # one process, same result

Every rank builds the same Module from the same seed, wraps it in
``DistributedDataParallel`` and trains on its own ``B / N`` samples per step; DDP
all-reduces (averages) the gradients during ``backward()``, so every rank applies
the same update and the run equals a single process training on the full batch.

Reading order (``main`` at the bottom calls these in turn): the whole of what data
parallelism adds is ``setup`` (core/dist.py: join the process group, one device per
rank), ``rank_loader`` (core/data.py: this rank's share of each global batch),
``ddp_wrap`` (below: ``DDP(model)``) and ``teardown`` (core/dist.py). Everything else,
``train_loop`` (core/loop.py) included, is what a single-process trainer does too.
examples/ddp.py is the same idea in 90 lines with nothing else around it.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core import dist as dist_env
from ddp_demo.core import log, malloc
from ddp_demo.core.config import ConfigError, TrainConfig, parse_config
from ddp_demo.core.data import Task, builtin_task, heldout_counts, load_task, rank_loader
from ddp_demo.core.dist import DistContext, LaunchEnv, all_ranks_equal, launch_env, pick_device, setup, teardown
from ddp_demo.core.loop import NonFiniteLoss, StepLog, StopRequested, loss_function, make_optimizer, train_loop
from ddp_demo.core.models import build_model
from ddp_demo.core.outputs import check_out_dir, write_outputs
from ddp_demo.doctor import LaunchProblem, preflight
from ddp_demo.parallel.ddp import ScratchDDP
from ddp_demo.resilience import checkpoint
from ddp_demo.resilience.faults import FaultInjector
from ddp_demo.resilience.resume import Checkpointer, checkpoint_state, resolve_resume, restore
from ddp_demo.resilience.signals import StopSignals, is_peer_failure


def make_task(cfg: TrainConfig) -> Task:
    if cfg.data:
        return load_task(cfg.data, cfg.model, cfg.torch_dtype, cfg.seed)
    return builtin_task(cfg.model, cfg.seed, cfg.torch_dtype)


def make_model(cfg: TrainConfig, task: Task, device: torch.device) -> torch.nn.Module:
    """The same seed on every rank gives the same initial weights (DDP also
    broadcasts rank 0's at construction); seeding makes runs repeatable across N."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, task.x_shape, task.num_classes).to(device=device, dtype=cfg.torch_dtype)


def ddp_wrap(model: torch.nn.Module, ctx: DistContext, wrapper: str = "torch") -> torch.nn.Module:
    """The one line data parallelism adds to a model: ``DDP(model)``.

    DDP broadcasts rank 0's parameters and buffers now, and from here on every
    ``backward()`` averages the gradients over the ranks (in buckets, while backward
    runs). Without a process group (plain ``python``) there is nothing to average with.
    ``--ddp scratch`` wraps with ddp_demo's own ``ScratchDDP`` instead: the same work done
    by hooks and tensor ops you can read (ddp_demo/parallel/ddp.py), with the same result.
    """
    if not ctx.distributed:
        return model
    if wrapper == "scratch":
        return ScratchDDP(model)
    return DDP(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)


class Torchrun:
    """How this entry point starts and wraps; ddp_demo.train_accelerate passes its own.

    Launchers differ only here: ``start`` joins the process group, ``wrap`` returns the
    model, optimizer and :class:`GradSync` (None: DDP ``no_sync``) the loop trains with,
    ``release`` drops what the launcher holds before ``teardown``; ``name`` is what
    summary.json records as the run's ``launcher``.
    """

    name = "torchrun"

    def start(self, env: LaunchEnv, cfg: TrainConfig) -> DistContext:
        self.name = env.launcher  # torchrun, srun, or python (plain `python -m ddp_demo.train`)
        return setup(env, cfg.device, cfg.backend, cfg.timeout)

    def wrap(self, model, optimizer, cfg: TrainConfig, ctx: DistContext) -> tuple:
        return ddp_wrap(model, ctx, cfg.ddp), optimizer, None

    def release(self) -> None:
        pass


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class RunFailed(Exception):
    """A failure every rank agrees on: rank 0 prints its one line, the process exits ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Attempt:
    """What this launch brings besides the config: where to resume, which restart, how to stop."""

    found: checkpoint.Found | None = None  # the checkpoint to resume from (None: start fresh)
    restart_count: int = 0  # torchrun's restart attempt; injected faults strike attempt 0 only
    stop: Callable[[], bool] = lambda: False  # True once a stop signal arrived (StopSignals)
    started: float = 0.0  # time.time() when main() began: the benchmark splits a run's wall time with it


def run(cfg: TrainConfig, task: Task, ctx: DistContext, attempt: Attempt = Attempt(), launcher=None) -> dict:
    """Train (resuming if asked), verify the ranks agree, write the outputs; returns the summary."""
    start = time.perf_counter()
    model = make_model(cfg, task, ctx.device)
    optimizer = make_optimizer(cfg, model.parameters())
    start_step, saved_logs = restore(attempt.found, model, optimizer, ctx)
    # A node that reads its own local --checkpoint-dir would resume elsewhere and desync the collectives.
    if not all_ranks_equal(torch.tensor([start_step], device=ctx.device), ctx):
        raise RunFailed(f"the ranks would resume from different steps (rank {ctx.rank}: step {start_step}): every node "
                        f"must see the same --checkpoint-dir {cfg.checkpoint_dir}; use a filesystem all nodes mount", 2)
    history = [StepLog(**entry) for entry in saved_logs]
    launcher = launcher or Torchrun()
    ddp, wrapped_optimizer, grad_sync = launcher.wrap(model, optimizer, cfg, ctx)
    loader = rank_loader(task.train, ctx, cfg.global_batch_size, cfg.seed)
    log.info(ctx.rank, f"training {cfg.model} on {ctx.world_size} process(es), device {ctx.device}, "
                       f"backend {ctx.backend}, {cfg.global_batch_size // ctx.world_size} samples per rank per step"
                       + (f" in {cfg.grad_accum_steps} micro-batches" if cfg.grad_accum_steps > 1 else ""))
    log.each(ctx.rank, f"device {ctx.device}, local rank {ctx.local_rank}", cfg.log_all_ranks)
    ckpt = Checkpointer(cfg, ctx, lambda step, epoch, logs: checkpoint_state(
        model, optimizer, cfg, ctx, history + logs, step, epoch), last_saved=start_step)
    fault = FaultInjector(cfg, ctx.rank, attempt.restart_count, attempt.stop)

    def after_step(step: int, epoch: int, logs: list[StepLog]) -> None:
        ckpt(step, epoch, logs)
        fault(step)

    timeline = {"main_started": attempt.started, "training_started": time.time()}
    try:
        logs = history + train_loop(ddp, wrapped_optimizer, loader, loss_function(task), cfg, ctx, grad_sync,
                                    start_step=start_step, after_step=after_step, stop_requested=attempt.stop)
    except NonFiniteLoss as e:
        kept = (f"checkpoint of step {ckpt.last_saved} kept in {cfg.checkpoint_dir}" if ckpt.last_saved
                else "no checkpoint had been written yet" if cfg.checkpoint_dir else "no --checkpoint-dir was given")
        raise RunFailed(f"{e}; {kept}; lower --lr and rerun") from None
    except StopRequested as e:
        ckpt.save_latest()
        where = f"checkpoint of step {e.step} in {cfg.checkpoint_dir}; rerun the same command to resume" \
            if cfg.checkpoint_dir else "no --checkpoint-dir, so this progress is lost"
        raise RunFailed(f"{e}: {where}", attempt.stop.exit_code()) from None
    timeline["training_ended"] = time.time()
    return finish(cfg, task, ctx, model, logs, start, launcher.name, timeline)


def finish(cfg: TrainConfig, task: Task, ctx: DistContext, model, logs: list[StepLog], start: float,
           launcher: str, timeline: dict) -> dict:
    identical = all_ranks_equal(flat_parameters(model), ctx)
    if identical:
        log.info(ctx.rank, f"all {ctx.world_size} rank(s) hold bit-identical parameters")
    correct, total = heldout_counts(model, task, ctx)
    timeline["checks_ended"] = time.time()
    summary = {
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "launcher": launcher,
        "backend": ctx.backend,
        "device": ctx.device.type,
        "torch_version": torch.__version__,
        "final_loss": logs[-1].loss,
        "heldout_accuracy": correct / total,
        "heldout_samples": total,
        "params_identical_across_ranks": identical,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "timeline": timeline,  # time.time() on rank 0 as each phase ended; bench.command splits a run with it
    }
    if ctx.is_main:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # no "module." prefix
        write_outputs(cfg.out, state, [entry.to_dict() for entry in logs], summary)
    log.info(ctx.rank, f"held-out accuracy {correct}/{total} = {correct / total:.3f}; "
                       f"final loss {logs[-1].loss:.4f}; wall time {summary['wall_time_s']:.1f} s; wrote {cfg.out}/")
    if not identical:
        raise RunFailed(
            "ranks hold different parameters after training: gradients were not synchronised"
            + (" (--skip-grad-sync was given)" if cfg.skip_grad_sync else "")
        )
    return summary


def prepare(argv: list[str] | None, env: LaunchEnv) -> tuple[TrainConfig, Task, checkpoint.Found | None]:
    """Everything that can reject the input, done before any process group or file exists."""
    cfg = parse_config(argv)
    if cfg.preflight:  # before the batch check: a wrong world size is the launch's fault, not the batch's
        passed = preflight(env.launched, env.world_size, cfg.device, cfg.backend, env.agent_store)
        log.info(env.rank, f"preflight: {passed} launch checks passed")
    cfg.check_batch_split(env.world_size)
    cfg.check_precision(pick_device(env.local_rank, cfg.device).type)
    check_out_dir(cfg.out)
    if cfg.checkpoint_dir:
        check_out_dir(cfg.checkpoint_dir, flag="--checkpoint-dir")
    task = make_task(cfg)
    return cfg, task, resolve_resume(cfg, env.rank)


def main(argv: list[str] | None = None, launcher=None) -> int:
    started = time.time()
    launcher = launcher or Torchrun()
    env = launch_env()
    try:
        cfg, task, found = prepare(argv, env)
        malloc.apply(cfg.malloc)  # before the process group, the model and the data loader allocate
        ctx = launcher.start(env, cfg)
    except LaunchProblem as e:  # a node's own setup: each node's first process says it, once per node
        log.error(env.local_rank, str(e))
        dist_env.after_one_spoke(env, speaker=env.rank - env.local_rank)  # torchrun numbers a node's ranks in a row
        return 2
    except (ConfigError, RuntimeError) as e:
        log.error(env.rank, str(e))
        dist_env.after_one_spoke(env, speaker=0)
        return 2
    stop = StopSignals()
    try:
        run(cfg, task, ctx, Attempt(found, env.restart_count, stop, started), launcher)
        return 0
    except RunFailed as e:
        log.error(ctx.rank, str(e))
        return e.code
    except Exception as e:
        if is_peer_failure(e):
            print(f"ddp_demo: error: [rank {ctx.rank}] lost contact with another rank (it died, hung or is "
                  f"unreachable; collectives give up after --timeout {cfg.timeout:g} s): "
                  f"{str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        else:  # a bug: the full traceback, from the rank it happened on
            print(f"[rank {ctx.rank}] " + "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
        # Drop the traceback's frames so the DDP model they hold is freed before teardown
        # (see dist.teardown for why that ordering matters).
        traceback.clear_frames(e.__traceback__)
        return 1
    finally:
        stop.restore()
        launcher.release()
        teardown()


if __name__ == "__main__":
    sys.exit(main())
