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
``ddp_wrap`` (below: ``DDP(model)``) and ``teardown`` (core/dist.py). ``run`` takes the
data through core/ once, in the order it flows: ``rank_loader`` (data.py), ``make_model``
and ``make_optimizer`` (models.py), the launcher's ``wrap``, ``train_loop`` (loop.py),
``finish`` (the checks, then outputs.py). Everything else, ``train_loop`` included, is
what a single-process trainer does too. examples/ddp.py is the same idea in 90 lines
with nothing else around it.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core import dist as dist_env
from ddp_demo.core import log, malloc
from ddp_demo.core.config import ConfigError, TrainConfig, parse_config
from ddp_demo.core.data import Task, builtin_task, heldout_counts, load_task, rank_loader
from ddp_demo.core.dist import DistContext, all_ranks_equal, pick_device, setup, teardown
from ddp_demo.core.env import LaunchEnv, launch_env, launch_variables, report_to_launcher
from ddp_demo.core.loop import LoopControl, NonFiniteLoss, StepLog, StopRequested, Wrapped, loss_function, train_loop
from ddp_demo.core.models import build_model, make_optimizer
from ddp_demo.core.outputs import RunRecord, check_out_dir, write_outputs
from ddp_demo.doctor import LaunchProblem, preflight
from ddp_demo.parallel.ddp import ScratchDDP
from ddp_demo.parallel.trainer_wrap import flat_parameters, sharded_by, strategy_wrap
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


class Launcher(Protocol):
    """How an entry point starts and wraps; launchers differ only here. ``start`` joins the
    process group, ``wrap`` returns what the loop trains with, ``release`` drops what the
    launcher holds before ``teardown``; ``name`` is summary.json's ``launcher``."""

    name: str
    def start(self, env: LaunchEnv, cfg: TrainConfig) -> DistContext: ...
    def wrap(self, model: torch.nn.Module, optimizer, cfg: TrainConfig, ctx: DistContext) -> Wrapped: ...
    def release(self) -> None: ...


class ProcessGroupLauncher:
    """This entry point's :class:`Launcher`, whoever started the process: torchrun, srun or
    plain ``python``. It joins the process group itself, from the environment the launcher
    left (core/dist.py), and wraps with ``DDP(model)`` (``--ddp scratch``: ScratchDDP);
    gradients sync by DDP's ``no_sync``. ddp_demo.train_accelerate passes its own."""

    name = "torchrun"

    def start(self, env: LaunchEnv, cfg: TrainConfig) -> DistContext:
        self.name = env.launcher  # torchrun, srun, or python (plain `python -m ddp_demo.train`)
        return setup(env, cfg.device, cfg.backend, cfg.timeout)

    def wrap(self, model: torch.nn.Module, optimizer, cfg: TrainConfig, ctx: DistContext) -> Wrapped:
        return strategy_wrap(model, optimizer, cfg, ctx)

    def release(self) -> None:
        pass


class RunFailed(Exception):
    """A failure every rank agrees on: rank 0 prints its one line, the process exits ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Attempt:
    """What this launch brings besides the config: where to resume, which restart, how to stop."""

    resume_from: checkpoint.Found | None = None  # the checkpoint to resume from (None: start fresh)
    restart_count: int = 0  # torchrun's restart attempt; injected faults strike attempt 0 only
    stop: StopSignals = field(default_factory=lambda: StopSignals(listen=False))  # main's listens to SIGTERM/SIGINT
    started: float = 0.0  # time.time() when main() began: the benchmark splits a run's wall time with it


def run(cfg: TrainConfig, task: Task, ctx: DistContext, attempt: Attempt = Attempt(),
        launcher: Launcher | None = None) -> dict:
    """Train (resuming if asked), verify the ranks agree, write the outputs; returns the summary."""
    launcher = launcher or ProcessGroupLauncher()
    record = RunRecord(launcher.name, attempt.started)
    loader = rank_loader(task.train, ctx, cfg.global_batch_size, cfg.seed)
    model = make_model(cfg, task, ctx.device)
    optimizer = make_optimizer(cfg.optimizer, cfg.lr, model.parameters())
    wrapped = launcher.wrap(model, optimizer, cfg, ctx)  # (resumed after: zero and fsdp build optimizers here)
    start_step, history = resume(attempt.resume_from, model, wrapped.optimizer, cfg, ctx)
    announce(cfg, ctx, wrapped.model)
    ckpt = Checkpointer(cfg, ctx, lambda step, epoch, logs: checkpoint_state(
        model, wrapped.optimizer, cfg, ctx, history + logs, step, epoch), start_step, (model, wrapped.optimizer))
    record.mark("training_started")
    with failures_explained(cfg, ckpt, attempt.stop):
        logs = history + train_loop(wrapped, loader, loss_function(task), cfg, ctx,
                                    loop_control(cfg, ctx, attempt, ckpt, start_step))
    record.mark("training_ended")
    return finish(cfg, task, ctx, wrapped, logs, record)


def resume(found: checkpoint.Found | None, model: torch.nn.Module, optimizer, cfg: TrainConfig,
           ctx: DistContext) -> tuple[int, list[StepLog]]:
    """Put the checkpoint's state back (if resuming); the step to go on from and the steps logged before it."""
    start_step, saved_logs = restore(found, model, optimizer, ctx, cfg)
    # A node that reads its own local --checkpoint-dir would resume elsewhere and desync the collectives.
    if not all_ranks_equal(torch.tensor([start_step], device=ctx.device), ctx):
        raise RunFailed(f"the ranks would resume from different steps (rank {ctx.rank}: step {start_step}): every node "
                        f"must see the same --checkpoint-dir {cfg.checkpoint_dir}; use a filesystem all nodes mount", 2)
    return start_step, [StepLog(**entry) for entry in saved_logs]


def announce(cfg: TrainConfig, ctx: DistContext, model: torch.nn.Module) -> None:
    log.info(ctx.rank, f"training {cfg.model} on {ctx.world_size} process(es), strategy {cfg.strategy}, "
                       + sharded_by(model, cfg, ctx)
                       + ("fsdp mixed precision: bf16 parameters in forward and backward, gradients "
                          "reduce-scattered in float32 (strategy.BF16_POLICY), "
                          if cfg.strategy == "fsdp" and cfg.precision == "bf16" else "")
                       + f"device {ctx.device}, "
                       f"backend {ctx.backend}, {cfg.global_batch_size // ctx.world_size} samples per rank per step"
                       + (f" in {cfg.grad_accum_steps} micro-batches" if cfg.grad_accum_steps > 1 else ""))
    log.each(ctx.rank, f"device {ctx.device}, local rank {ctx.local_rank}", cfg.log_all_ranks)


def loop_control(cfg: TrainConfig, ctx: DistContext, attempt: Attempt, ckpt: Checkpointer,
                 start_step: int) -> LoopControl:
    """After each applied step: save on schedule, then (tests and demos) strike an injected fault."""
    fault = FaultInjector(cfg, ctx.rank, attempt.restart_count, attempt.stop)

    def after_step(step: int, epoch: int, logs: list[StepLog]) -> None:
        ckpt(step, epoch, logs)
        fault(step)

    return LoopControl(start_step, after_step, attempt.stop)


@contextlib.contextmanager
def failures_explained(cfg: TrainConfig, ckpt: Checkpointer, stop: StopSignals) -> Iterator[None]:
    """A non-finite loss or a stop request becomes a :class:`RunFailed` that says what was kept."""
    try:
        yield
    except NonFiniteLoss as e:
        kept = (f"checkpoint of step {ckpt.last_saved} kept in {cfg.checkpoint_dir}" if ckpt.last_saved
                else "no checkpoint had been written yet" if cfg.checkpoint_dir else "no --checkpoint-dir was given")
        raise RunFailed(f"{e}; {kept}; lower --lr and rerun") from None
    except StopRequested as e:
        ckpt.save_latest()
        where = f"checkpoint of step {e.step} in {cfg.checkpoint_dir}; rerun the same command to resume" \
            if cfg.checkpoint_dir else "no --checkpoint-dir, so this progress is lost"
        raise RunFailed(f"{e}: {where}", stop.exit_code()) from None


def finish(cfg: TrainConfig, task: Task, ctx: DistContext, wrapped: Wrapped, logs: list[StepLog],
           record: RunRecord) -> dict:
    """Check the ranks agree, score the held-out data, write the outputs; returns the summary."""
    model = getattr(wrapped.model, "module", wrapped.model)  # DDP and ScratchDDP keep the user's Module there
    agreed = wrapped.agreed_tensor() if wrapped.agreed_tensor else flat_parameters(model)
    identical = all_ranks_equal(agreed, ctx)
    if identical:
        log.info(ctx.rank, f"all {ctx.world_size} rank(s) hold bit-identical parameters"
                 + (" (fsdp: the gathered parameters and the buffers)" if wrapped.agreed_tensor else ""))
    correct, total = heldout_counts(model, task, ctx)
    full = wrapped.full_state() if wrapped.full_state else None  # every rank: fsdp all-gathers
    record.mark("checks_ended")
    summary = record.summary(cfg, ctx, {"final_loss": logs[-1].loss, "heldout_accuracy": correct / total,
                                        "heldout_samples": total, "params_identical_across_ranks": identical})
    if ctx.is_main:
        state = full if wrapped.full_state else {k: v.detach().cpu() for k, v in model.state_dict().items()}
        write_outputs(cfg.out, state, [entry.to_dict() for entry in logs], summary)
    t = record.timeline  # training alone, then the run around it (loader, model, checks); imports come before
    log.info(ctx.rank, f"held-out accuracy {correct}/{total} = {correct / total:.3f}; final loss {logs[-1].loss:.4f}; "
                       f"trained in {t['training_ended'] - t['training_started']:.2f} s (set-up and checks included: "
                       f"{summary['wall_time_s']:.1f} s); wrote {cfg.out}/")
    if not identical:
        raise RunFailed(
            ("ranks hold different buffers or unsharded parameters after training: FSDP2 never syncs them "
             "(BatchNorm: ddp_demo.convert_sync_batchnorm)" if wrapped.agreed_tensor and not cfg.skip_grad_sync else
             "ranks hold different parameters after training: gradients were not synchronised")
            + (" (--skip-grad-sync was given)" if cfg.skip_grad_sync else "")
        )
    return summary


def prepare(argv: list[str] | None, env: LaunchEnv) -> tuple[TrainConfig, Task, checkpoint.Found | None]:
    """Everything that can reject the input, done before any process group or file exists."""
    cfg = parse_config(argv)
    if cfg.preflight:  # before the batch check: a wrong world size is the launch's fault, not the batch's
        passed = preflight(launch_variables(), env.launched, env.world_size, cfg.device, cfg.backend,
                           env.agent_store)
        log.info(env.rank, f"preflight: {passed} launch checks passed")
    cfg.check_batch_split(env.world_size)
    cfg.check_precision(pick_device(env.local_rank, cfg.device).type)
    check_out_dir(cfg.out)
    if cfg.checkpoint_dir:
        check_out_dir(cfg.checkpoint_dir, flag="--checkpoint-dir")
    task = make_task(cfg)
    return cfg, task, resolve_resume(cfg, env.rank)


def main(argv: list[str] | None = None, launcher: Launcher | None = None) -> int:
    started = time.time()
    launcher = launcher or ProcessGroupLauncher()
    env = launch_env()
    try:
        cfg, task, found = prepare(argv, env)
        malloc.apply(cfg.malloc)  # before the process group, the model and the data loader allocate
        ctx = launcher.start(env, cfg)
    except LaunchProblem as e:  # a node's own setup: each node's first process says it, once per node
        log.error(env.local_rank, str(e))
        report_to_launcher(env, f"ddp_demo: error: {e}")
        dist_env.after_one_spoke(env, speaker=env.rank - env.local_rank)  # torchrun numbers a node's ranks in a row
        return 2
    except (ConfigError, RuntimeError) as e:
        log.error(env.rank, str(e))
        report_to_launcher(env, f"ddp_demo: error: {e}")
        dist_env.after_one_spoke(env, speaker=0)
        return 2
    stop = StopSignals()
    try:
        run(cfg, task, ctx, Attempt(found, env.restart_count, stop, started), launcher)
        return 0
    except (RunFailed, ConfigError) as e:  # ConfigError: a checkpoint every rank refuses alike (exit 2)
        log.error(ctx.rank, str(e))
        report_to_launcher(env, f"ddp_demo: error: {e}")
        return getattr(e, "code", 2)
    except Exception as e:
        return crashed(e, ctx, cfg)
    finally:
        stop.restore()
        launcher.release()
        teardown()


def crashed(e: Exception, ctx: DistContext, cfg: TrainConfig) -> int:
    """An exception nobody expected: one line if a peer was lost, else the full traceback. Exit code 1."""
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


if __name__ == "__main__":
    sys.exit(main())
