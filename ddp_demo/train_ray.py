"""Data-parallel training under Ray Train: the same job as ``ddp_demo.train``.

    python -m ddp_demo.train_ray --workers 2 [trainer flags]                 # a local Ray cluster
    python -m ddp_demo.train_ray --address auto --workers 8 [trainer flags]  # a running cluster

The command starts a Ray cluster on this machine (or joins one), and
``ray.train.torch.TorchTrainer`` starts N workers. Only start-up differs from
ddp_demo.train: before a worker's function runs, the TorchTrainer has already joined the
process group (gloo, or nccl when the workers have GPUs) and set ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun does
(ray/train/torch/config.py, ``_TorchBackend.on_start``), so :class:`RayLauncher` takes that
group instead of joining one. The flags, data, model, loop, checks and output files are
ddp_demo.train's, and summary.json records the launcher as ``ray``.

Fault tolerance is Ray's: with ``--max-failures K`` a worker that dies makes Ray stop the
group and start it again, up to K times (``FailureConfig``); the new workers resume from
the newest checkpoint in ``--checkpoint-dir``, which must be on a path every worker sees.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ddp_demo import train
from ddp_demo.core import log
from ddp_demo.core.config import ConfigError, TrainConfig, parse_config
from ddp_demo.core.dist import DistContext, pick_device
from ddp_demo.core.env import RAY_RESTARTS, LaunchEnv
from ddp_demo.core.loop import Wrapped

# Quiet, as torchrun is: Ray copies a Train worker's print() into its own log as well, so each
# line reached the terminal twice (measured on Ray 2.60); Ray's own Python logs: errors only.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# A cluster on one machine has no node to be preempted: no watcher actor (a process, and an error
# line of Ray's own every run). A cluster joined with --address keeps it.
LOCAL_ENV = {**WORKER_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
RAY_LOGS = "ERROR"


@dataclass(frozen=True)
class RayOptions:
    """How Ray runs the job; the trainer's own flags follow them on the command line."""

    workers: int = 2  # training processes (Ray Train workers)
    max_failures: int = 0  # times Ray restarts the group after a worker fails
    address: str | None = None  # a running cluster to join; None: start one here


def ray_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp_demo.train_ray", add_help=False, allow_abbrev=False,
                                     description="ddp_demo.train under Ray Train; any other flag is the trainer's "
                                                 "(python -m ddp_demo.train --help)")
    parser.add_argument("--workers", type=int, default=2, help="training processes [default: 2]")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="restart the workers up to K times after one fails; they resume from --checkpoint-dir "
                             "[default: 0]")
    parser.add_argument("--address", default=None,
                        help="join this running Ray cluster (e.g. auto) instead of starting one here")
    return parser


class RayLauncher:
    """What ddp_demo.train does differently in a Ray Train worker: it joins no process group."""

    name = "ray"  # summary.json's "launcher"

    def start(self, env: LaunchEnv, cfg: TrainConfig) -> DistContext:
        if not dist.is_initialized():
            raise RuntimeError("no process group: run ddp_demo.train_ray's workers under Ray's TorchTrainer")
        device = pick_device(env.local_rank, cfg.device)
        if device.type == "cuda":
            device = ray.train.torch.get_device()  # the GPU Ray gave this worker
            torch.cuda.set_device(device)
        return DistContext(env.rank, env.local_rank, env.world_size, device, dist.get_backend())

    def wrap(self, model, optimizer, cfg: TrainConfig, ctx: DistContext) -> Wrapped:
        return Wrapped(train.ddp_wrap(model, ctx, cfg.ddp), optimizer)

    def release(self) -> None:
        pass


@ray.remote(num_cpus=0)
class Attempts:
    """Each rank's starts and exit codes, kept by the driver's side of the cluster.

    Ray tells a worker nothing of earlier attempts, and an injected fault must strike the
    first attempt only (under torchrun the agent counts its restarts in
    TORCHELASTIC_RESTART_COUNT). And the exit code travels back here rather than as an
    exception, which would make Ray restart the group: bad input never deserves that.
    """

    def __init__(self):
        self.starts: dict[int, int] = {}
        self.codes: dict[int, int] = {}

    def start(self, rank: int) -> int:
        """This rank's restart count: how many times it was started before."""
        self.starts[rank] = self.starts.get(rank, -1) + 1
        self.codes.pop(rank, None)  # an earlier attempt's code is not this one's
        return self.starts[rank]

    def exit(self, rank: int, code: int) -> None:
        self.codes[rank] = code

    def restarts(self) -> int:
        return max(self.starts.values(), default=0)

    def exit_code(self) -> int:
        """The first non-zero exit code of the last attempt's ranks (1 if none finished)."""
        return max(self.codes.values(), key=bool) if self.codes else 1


def worker(config: dict) -> None:
    """Each Ray worker runs ddp_demo.train's main. A worker that dies returns nothing: Ray
    restarts the group, as many times as --max-failures allows."""
    attempts = config["attempts"]
    rank = ray.train.get_context().get_world_rank()
    os.environ[RAY_RESTARTS] = str(ray.get(attempts.start.remote(rank)))  # read by core/env.py
    ray.get(attempts.exit.remote(rank, train.main(config["argv"], launcher=RayLauncher())))


def absolute_paths(cfg: TrainConfig) -> list[str]:
    """Flags that make the trainer's paths absolute: a Ray worker does not start in this directory."""
    paths = {"--out": cfg.out, "--checkpoint-dir": cfg.checkpoint_dir, "--data": cfg.data,
             "--resume": None if cfg.resume in ("auto", "never") else cfg.resume}
    return [part for flag, path in paths.items() if path for part in (flag, str(Path(path).absolute()))]


def start_cluster(opts: RayOptions) -> None:
    """A local cluster with as many CPUs as workers, no dashboard, Ray's own logs at error level."""
    if opts.address is not None:
        ray.init(address=opts.address, logging_level=RAY_LOGS, runtime_env={"env_vars": WORKER_ENV},
                 logging_config=ray.LoggingConfig(log_level=RAY_LOGS))
        return
    ray.init(num_cpus=opts.workers, include_dashboard=False, logging_level=RAY_LOGS,
             runtime_env={"env_vars": LOCAL_ENV}, logging_config=ray.LoggingConfig(log_level=RAY_LOGS))


def fit(cfg: TrainConfig, argv: list[str], opts: RayOptions) -> int:
    """Run the job on the cluster; the workers' agreed exit code."""
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus >= opts.workers)  # one GPU per worker
    if use_gpu and gpus < opts.workers:
        raise ConfigError(f"--device cuda: the Ray cluster has {gpus:g} GPU(s) for {opts.workers} workers; "
                          "use fewer --workers or --device cpu")
    attempts = Attempts.remote()
    storage = tempfile.mkdtemp(prefix="ddp_demo_ray_")  # Ray's run records; the outputs go to --out
    backend = None if cfg.backend == "auto" else cfg.backend  # None: Ray picks nccl with GPUs, else gloo
    trainer = TorchTrainer(
        worker,
        train_loop_config={"argv": argv + absolute_paths(cfg), "attempts": attempts},
        torch_config=TorchConfig(backend=backend, timeout_s=math.ceil(cfg.timeout)),
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=storage, name="ddp_demo", logging_config=LoggingConfig(log_level=RAY_LOGS),
                             failure_config=FailureConfig(max_failures=opts.max_failures)),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        log.error(0, f"Ray gave up after {opts.max_failures} restart(s) (--max-failures): "
                     f"{str(e).strip().splitlines()[0]}")
        return 1
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    restarts, code = ray.get([attempts.restarts.remote(), attempts.exit_code.remote()])
    log.info(0, f"ray: {opts.workers} worker(s), restarted {restarts} time(s) (--max-failures {opts.max_failures}), "
                f"exit code {code}")
    return code


def parse(argv: list[str]) -> tuple[RayOptions, TrainConfig, list[str]]:
    """Ray's flags, then the trainer's, each checked for N workers before anything starts."""
    if "-h" in argv or "--help" in argv:
        ray_parser().print_help()
        print("\ntrainer flags (python -m ddp_demo.train --help):")
        parse_config(["--help"])
    args, rest = ray_parser().parse_known_args(argv)
    if args.workers < 1 or args.max_failures < 0:
        raise ConfigError("--workers must be at least 1 and --max-failures at least 0")
    cfg = parse_config(rest)
    if cfg.strategy != "ddp":
        raise ConfigError(f"--strategy {cfg.strategy} is not wired into the Ray launcher (it wraps with DDP); "
                          "launch ddp_demo.train with torchrun, or drop --strategy")
    if cfg.preflight:
        raise ConfigError("--preflight checks a torchrun launch; Ray starts and connects its workers itself: drop it")
    train.prepare(rest, LaunchEnv(world_size=args.workers, launched=True))  # the trainer's own checks, for N
    return RayOptions(args.workers, args.max_failures, args.address), cfg, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts, cfg, rest = parse(argv)
    except (ConfigError, RuntimeError) as e:
        log.error(0, str(e))
        return 2
    started_here = not ray.is_initialized()
    if started_here:
        start_cluster(opts)
    try:
        return fit(cfg, rest, opts)
    except ConfigError as e:
        log.error(0, str(e))
        return 2
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
