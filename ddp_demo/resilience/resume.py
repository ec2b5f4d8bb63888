"""Resume: which checkpoint a run continues from, what goes into one, and when it is written.

A run is resumable when a checkpoint holds everything the rest of the run depends on:
the weights, the optimizer's state (momentum, Adam's moments), the RNG state, the step
(which fixes the epoch and the position in it, see ``core.loop.epoch_batches``) and the
losses logged so far. ``restore`` puts all of it back; ``Checkpointer`` saves it on
schedule: one file from global rank 0 while the other ranks wait, or (``--checkpoint-format
sharded``) a directory every rank writes its shards into (resilience/sharded.py).

Checkpoints are loaded after wrapping (zero and fsdp build their optimizers there): a file
resumed by ddp as it always was, anything else (a sharded checkpoint; a file under zero or
fsdp) through the strategy-independent names of parallel/state_dict.py (``load_resharded``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ddp_demo.core import log
from ddp_demo.core.config import ConfigError, TrainConfig
from ddp_demo.core.dist import DistContext
from ddp_demo.resilience import checkpoint, sharded


def resolve_resume(cfg: TrainConfig, rank: int) -> checkpoint.Found | None:
    """The checkpoint this run continues from, or None to start fresh.

    ``--resume auto`` takes the newest checkpoint that verifies, reporting (once) every
    newer one it had to skip; if checkpoints exist but none verifies, that is an error
    rather than a silent restart from step 0.
    """
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        try:
            found = checkpoint.Found(Path(cfg.resume), checkpoint.load(cfg.resume), [])
        except FileNotFoundError:
            raise ConfigError(f"--resume {cfg.resume}: no such file; pass a checkpoint path, auto or never") from None
        except sharded.NewerFormat as e:
            raise ConfigError(str(e)) from None
        except Exception as e:
            raise ConfigError(f"--resume {cfg.resume}: not a valid checkpoint ({e}); pass another or never") from None
    elif cfg.checkpoint_dir is None or not checkpoint.checkpoints(cfg.checkpoint_dir):
        return None
    else:
        found = checkpoint.newest_valid(cfg.checkpoint_dir)
        if found is None:
            raise ConfigError(
                f"--checkpoint-dir {cfg.checkpoint_dir} holds checkpoints but none is valid; "
                "remove them, use another --checkpoint-dir, or pass --resume never"
            )
    for line in found.skipped:
        log.error(rank, line)
    checkpoint.check_compatible(found.state, cfg.to_dict(), found.path)
    return found


class Checkpointer:
    """Saves on schedule: every ``--checkpoint-every`` steps and at the last step."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, state_fn, last_saved: int = 0, trained=None):
        self.cfg, self.ctx, self.state_fn = cfg, ctx, state_fn
        self.trained = trained  # (module, optimizer) that sharded checkpoints are taken of
        self.last_saved = last_saved  # a resumed run need not rewrite the checkpoint it came from
        self._latest = (0, 0, [])  # (step, epoch, logs) of the last applied step

    def __call__(self, step: int, epoch: int, logs: list) -> None:
        self._latest = (step, epoch, logs)
        if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps:
            self.save_latest()

    def save_latest(self) -> None:
        """Global rank 0 writes; everyone waits so no rank runs ahead of a checkpoint."""
        step, epoch, logs = self._latest
        if not self.cfg.checkpoint_dir or step == 0 or step == self.last_saved:
            return
        if self.cfg.sharded_checkpoints:  # every rank writes its shards; rank 0 commits and prunes
            meta = self.state_fn(step, epoch, logs) if self.ctx.is_main else {}  # meta.pt: rank 0's
            sharded.save(self.cfg.checkpoint_dir, step, *self.trained, meta, self.ctx.is_main)
            if self.ctx.is_main:
                checkpoint.prune(Path(self.cfg.checkpoint_dir), self.cfg.keep_last)
        elif self.ctx.is_main:
            checkpoint.save(self.cfg.checkpoint_dir, step, self.state_fn(step, epoch, logs), self.cfg.keep_last)
        if dist.is_initialized():
            dist.barrier()
        self.last_saved = step


def checkpoint_state(model: torch.nn.Module, optimizer, cfg: TrainConfig, ctx: DistContext, logs: list,
                     step: int, epoch: int) -> dict:
    """Everything an exact resume needs, in plain tensors and containers (weights_only-safe).
    Sharded: all but the model and optimizer, which every rank writes through DCP."""
    tensors = {} if cfg.sharded_checkpoints else {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    return {
        **tensors,
        "step": step,
        "epoch": epoch,
        "rng": checkpoint.rng_state(),
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "strategy": cfg.strategy,
        "params": [n for n, _ in model.named_parameters()],  # the optimizer's indices by name (ddp_demo.checkpoint)
        "logs": [entry.to_dict() for entry in logs],
    }


def restore(found: checkpoint.Found | None, model, optimizer, ctx: DistContext,
            cfg: TrainConfig) -> tuple[int, list[dict]]:
    """Every rank, after wrapping: load a checkpoint into the user's Module and the optimizer
    the strategy trains with; return (step, logged steps)."""
    if found is None:
        return 0, []
    state = found.state
    if found.sharded or cfg.strategy != "ddp":
        load_resharded(found, model, optimizer)
    else:  # one file into DDP's replicas (the same values on every rank)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["rng"])
    log.info(ctx.rank, f"resuming from {found.path}: step {state['step']}, epoch {state['epoch']}, "
                       f"saved by {state['world_size']} process(es)"
                       + (f" under --strategy {state['strategy']}" if "strategy" in state else ""))
    if state["world_size"] != ctx.world_size:
        log.info(ctx.rank, world_size_change(state, ctx.world_size))
    return state["step"], state["logs"]


def world_size_change(state: dict, world_size: int) -> str:
    """The one line that says when (the step resumed from) and why the world size changed."""
    before, step = state["world_size"], state["step"]
    why = ("a node left or failed, or the job was relaunched smaller" if world_size < before
           else "a node joined, or the job was relaunched larger")
    return (f"world size {before} -> {world_size} at step {step}: {world_size} process(es) resume what {before} "
            f"saved ({why}); the global batch of {state['config']['global_batch_size']} and the sample order are "
            "kept, so results match within float rounding, not bit for bit")


def load_resharded(found: checkpoint.Found, module, optimizer) -> None:
    """The checkpoint's model and optimizer state, by strategy-independent names, into this
    rank's layout: its shards under fsdp, its partition's optimizer state under zero."""
    if found.sharded:
        try:
            sharded.load(found.path, module, optimizer, found.state)
        except ValueError as e:  # another model's checkpoint: the same refusal as another setup's
            raise ConfigError(f"{e}; use another --checkpoint-dir, or --resume never") from None
        return
    from ddp_demo.parallel import state_dict

    state, groups = state_dict.from_file_state(found.state, [n for n, _ in module.named_parameters()])
    state_dict.apply_state(module, optimizer, state, groups, full=True)
