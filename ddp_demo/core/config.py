"""Typed training configuration and the command line built from it (core/flags.py).

Each field's ``help`` is its one-line documentation and its ``--flag`` help text.
``__post_init__`` rejects bad values with a :class:`ConfigError` whose message names
the flag and the fix; the caller prints it once (rank 0) and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from ddp_demo.core.flags import OneLineParser, add_options, field_named, flag, option, parse_into
from ddp_demo.core.malloc import MALLOC_CHOICES
from ddp_demo.core.models import MODEL_NAMES

OPTIMIZERS = ("sgd", "adam")
# The learning rate the proofs and python -m ddp_demo.check train with, per optimizer
PROOF_LR = {"sgd": 0.05, "adam": 0.01}
STRATEGIES = ("ddp", "zero", "fsdp")  # --strategy: ddp_demo/parallel/strategy.py
WRAPPERS = ("torch", "scratch")  # --ddp: torch's DDP or fully_shard, or ddp_demo's ScratchDDP or ScratchFSDP
# The one dtype table: the --dtype name and the torch dtype it means.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_FORMATS = ("auto", "file", "sharded")  # --checkpoint-format: resilience/checkpoint.py, sharded.py
BACKENDS = ("auto", "gloo", "nccl")
FAULT_KINDS = ("kill", "hang", "pause")  # resilience/faults.py


# The trainer's --help lists its flags in these groups, the test-only ones last.
JOB = "the job (what one process would train)"
PROCESSES = "the processes (how the job is spread and run)"
OUTPUT = "output"
CHECKPOINTS = "checkpoints and resuming"
TESTING = "for tests and demos (not for training)"


class ConfigError(ValueError):
    """A bad flag or input file; its message is the one line the user sees."""


@dataclass(frozen=True)
class TrainConfig:
    model: str = option("mlp", "which of the article's modules to train", MODEL_NAMES, group=JOB)
    steps: int = option(300, "optimizer steps to run (across epochs)", group=JOB)
    global_batch_size: int = option(64, "samples per step over all ranks; must divide by the world size", group=JOB)
    grad_accum_steps: int = option(
        1, "split each rank's batch into K micro-batches and sync gradients once, after the K-th", group=JOB
    )
    lr: float = option(0.05, "learning rate", group=JOB)
    ddp: str = option("torch", "whose wrapper: torch's (DistributedDataParallel; under --strategy fsdp, fully_shard) "
                      "or scratch, ddp_demo's own written from hooks and tensor ops (ScratchDDP, "
                      "ddp_demo/parallel/ddp.py; under fsdp, ScratchFSDP, ddp_demo/parallel/fsdp.py)", WRAPPERS,
                      group=PROCESSES)
    strategy: str = option("ddp", "ddp: every rank holds the whole model; zero: DDP plus optimizer state sharded "
                           "(ZeroRedundancyOptimizer); fsdp: parameters, gradients and optimizer state sharded "
                           "(fully_shard, docs/sharding.md)", STRATEGIES, group=PROCESSES)
    optimizer: str = option("sgd", "sgd (momentum 0.9) or adam", OPTIMIZERS, group=JOB)
    seed: int = option(0, "seeds the model init, the built-in data and the sampler order", group=JOB)
    dtype: str = option("float32", "parameter and data dtype", tuple(DTYPES), group=JOB)
    data: str | None = option(None, "a .pt file holding a tuple (x, y) to train on instead of built-in data",
                              type_=str, group=JOB)
    out: str = option("runs/latest", "directory for final.pt, metrics.jsonl and summary.json", group=OUTPUT)
    device: str = option("auto", "cuda:LOCAL_RANK when CUDA is available, else cpu", DEVICES, group=PROCESSES)
    backend: str = option("auto", "process-group backend; auto picks nccl for cuda, gloo for cpu", BACKENDS,
                          group=PROCESSES)
    timeout: float = option(120.0, "seconds a collective may wait for its peers before failing", group=PROCESSES)
    log_all_ranks: bool = option(False, "also log from non-zero ranks, prefixed [rank N]", group=OUTPUT)
    log_every: int = option(1, "write the agreed loss to metrics.jsonl every K steps (on CUDA also how often the "
                            "host waits for the GPU to read it)", group=OUTPUT)
    malloc: str = option("keep", "keep: glibc keeps freed memory for reuse, so steps do not page-fault it back in "
                         "(core/malloc.py); default: glibc's own thresholds", MALLOC_CHOICES, group=PROCESSES)
    precision: str = option("fp32", "autocast the forward pass: fp32 (off), bf16 (CPU and CUDA), fp16 with a "
                            "GradScaler (CUDA only)", PRECISIONS, group=JOB)
    preflight: bool = option(False, "first run the launch doctor's checks (python -m ddp_demo.doctor); a failure "
                             "exits 2", group=PROCESSES)
    checkpoint_dir: str | None = option(None, "save checkpoints here and resume from the newest valid one",
                                        type_=str, group=CHECKPOINTS)
    checkpoint_every: int = option(50, "steps between checkpoints (one is always written at the last step)",
                                   group=CHECKPOINTS)
    keep_last: int = option(3, "how many checkpoints to keep in --checkpoint-dir", group=CHECKPOINTS)
    checkpoint_format: str = option("auto", "file: one file written by rank 0; sharded: every rank writes its shards "
                                    "(torch.distributed.checkpoint), resumable at any world size and strategy; auto: "
                                    "file under ddp, sharded under zero and fsdp", CHECKPOINT_FORMATS,
                                    group=CHECKPOINTS)
    resume: str = option("auto", "auto: newest valid checkpoint if any; never: start fresh; or a checkpoint PATH",
                         group=CHECKPOINTS)
    record_samples: bool = option(False, "record each step's sample ids, rank by rank, in metrics.jsonl", group=TESTING)
    inject_fault: str | None = option(
        None, "for tests and demos: KIND:RANK:STEP[:ATTEMPT] with KIND kill (SIGKILL), hang (SIGSTOP) or pause (wait "
        "for a stop signal, at most --timeout s), after STEP, in attempt ATTEMPT only (torchrun's restart count, "
        "counted by each node's agent; default 0, the first)",
        type_=str, group=TESTING,
    )
    skip_grad_sync: bool = option(
        False, "negative control: never all-reduce gradients (DDP.no_sync every step); the run then fails its check",
        group=TESTING,
    )

    def __post_init__(self):
        for name in ("model", "strategy", "optimizer", "ddp", "dtype", "device", "backend", "precision", "malloc",
                     "checkpoint_format"):
            choices = field_named(TrainConfig, name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"--{name} {getattr(self, name)!r} is not known; use one of: {', '.join(choices)}"
                )
        for name in ("steps", "global_batch_size", "grad_accum_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be a positive integer (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be a positive number (got {self.lr})")
        for name in ("checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be a positive integer (got {getattr(self, name)})")
        if self.inject_fault is not None:
            self.fault()  # validates the format
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds (got {self.timeout})")
        if self.precision != "fp32" and self.dtype != "float32":
            raise ConfigError(f"--precision {self.precision} autocasts float32 math; use it with --dtype float32")
        self.check_strategy()

    def check_strategy(self) -> None:
        """What --strategy zero and fsdp do not (yet) combine with: refused before any process starts."""
        if self.strategy == "ddp":
            return
        if self.strategy == "fsdp" and self.ddp == "scratch" and self.checkpoint_dir is not None:
            raise ConfigError("--checkpoint-dir with --strategy fsdp --ddp scratch: ScratchFSDP's shards are plain "
                              "tensors that DCP cannot place (parallel/fsdp.py); use --ddp torch to checkpoint")
        if self.checkpoint_format == "file":
            raise ConfigError(f"--checkpoint-format file with --strategy {self.strategy}: one file means gathering "
                              "the whole state on rank 0, which sharding avoids; use --checkpoint-format sharded")
        if self.strategy == "fsdp" and self.ddp == "scratch" and self.precision != "fp32":
            raise ConfigError(f"--precision {self.precision} with --strategy fsdp --ddp scratch: ScratchFSDP has no "
                              "mixed precision (parallel/fsdp.py); use --ddp torch, or drop --precision")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ConfigError("--precision fp16 with --strategy fsdp is not wired (its GradScaler over sharded "
                              "gradients is untested here); use --precision bf16")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are DCP directories (resilience/sharded.py) rather than one file."""
        return self.checkpoint_format == "sharded" or self.checkpoint_format == "auto" and self.strategy != "ddp"

    def check_precision(self, device_type: str) -> None:
        """fp16 needs a GradScaler, which this project runs on CUDA only (core/precision.py)."""
        if self.precision == "fp16" and device_type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device (it trains with a GradScaler there); "
                              "on the CPU use --precision bf16")

    def check_batch_split(self, world_size: int) -> None:
        """The global batch is split evenly: each rank gets ``B / N`` samples per step, in
        ``K`` equal micro-batches of ``B / (N * K)`` (equal, so that the mean of the
        micro-batch means is the mean over the rank's batch)."""
        parts, k = world_size * self.grad_accum_steps, self.grad_accum_steps
        if self.global_batch_size % parts:
            b = self.global_batch_size
            fix = (b // parts or 1) * parts
            what = f"the world size {world_size}" if k == 1 else \
                f"the world size {world_size} times --grad-accum-steps {k}"
            raise ConfigError(
                f"--global-batch-size {b} does not divide by {what}; "
                f"use a multiple of {parts}, e.g. --global-batch-size {fix}"
            )

    def fault(self) -> tuple[str, int, int, int] | None:
        """``--inject-fault kill:1:7`` -> ("kill", 1, 7, 0); ``pause:0:9:1`` -> ("pause", 0, 9, 1)."""
        if self.inject_fault is None:
            return None
        parts = self.inject_fault.split(":")
        if len(parts) not in (3, 4) or parts[0] not in FAULT_KINDS or not all(p.isdigit() for p in parts[1:]):
            raise ConfigError(
                f"--inject-fault {self.inject_fault!r} is not KIND:RANK:STEP[:ATTEMPT]; "
                "use e.g. --inject-fault kill:1:7"
            )
        return parts[0], int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DESCRIPTION = """Train one of the article's models with DistributedDataParallel: every process torchrun (or srun)
starts trains on its share of each global batch, and DDP averages the gradients, so N processes train what
one process trains. Plain `python -m ddp_demo.train` is that one process."""

EPILOG = """examples:
  torchrun --standalone --nproc_per_node=2 -m ddp_demo.train        # the default job on 2 CPU processes
  python -m ddp_demo.train                                          # the same job in one process
  torchrun --standalone --nproc_per_node=4 -m ddp_demo.train --model cnn --dtype float64 --out runs/cnn4

writes --out: final.pt, metrics.jsonl, summary.json (docs/trainer.md). Exit status: 0 trained and checked,
1 the run failed, 2 bad input (one line names the flag and the fix); under torchrun the worker's status is
the `exitcode` in torchrun's report, whose Root Cause repeats the line."""


def build_parser(prog: str = "python -m ddp_demo.train", description: str | None = DESCRIPTION,
                 epilog: str | None = EPILOG) -> argparse.ArgumentParser:
    # choices are validated in __post_init__ so the message names the fix the same way
    parser = OneLineParser(prog=prog, description=description, epilog=epilog, error_type=ConfigError,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_options(parser, TrainConfig)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a validated :class:`TrainConfig` (raises ConfigError)."""
    return parse_into(TrainConfig, build_parser(), argv)
