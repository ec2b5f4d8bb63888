"""What keeps a run from losing work: resume, periodic checkpoints, stop signals, faults.

The trainer wires these around the shared loop; none of them touch the model's math.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, log
from .config import ConfigError, TrainConfig
from .dist import DistContext


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
    """``after_step`` for the loop: inject a requested fault, then save on schedule."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, restart_count: int, state_fn):
        self.cfg, self.ctx, self.state_fn = cfg, ctx, state_fn
        self.fault = cfg.fault() if restart_count == 0 else None  # faults strike the first attempt only
        self.last_saved = 0
        self._latest = (0, 0, [])  # (step, epoch, logs) of the last applied step

    def __call__(self, step: int, epoch: int, logs: list) -> None:
        self._latest = (step, epoch, logs)
        self._maybe_fault(step)
        if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps:
            self.save_latest()

    def save_latest(self) -> None:
        """Global rank 0 writes; everyone waits so no rank runs ahead of a checkpoint."""
        step, epoch, logs = self._latest
        if not self.cfg.checkpoint_dir or step == 0 or step == self.last_saved:
            return
        if self.ctx.is_main:
            checkpoint.save(self.cfg.checkpoint_dir, step, self.state_fn(step, epoch, logs), self.cfg.keep_last)
        if dist.is_initialized():
            dist.barrier()
        self.last_saved = step

    def _maybe_fault(self, step: int) -> None:
        if self.fault and self.fault[1] == self.ctx.rank and self.fault[2] == step:
            kind = self.fault[0]
            log.each(self.ctx.rank, f"injecting fault {kind} at step {step}", True)
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at the next step.

    Raising from the handler instead could leave one rank inside a collective its peers
    never enter. A second signal falls back to the default behaviour (stop now).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.restore()

    def restore(self) -> None:
        """Put back the handlers that were there before (the run is over, or stopping)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __call__(self) -> bool:
        return self.received is not None

    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGTERM)


def is_peer_failure(e: BaseException) -> bool:
    """Errors that mean another rank died, hung or became unreachable mid-collective."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset", "Timed out", "timed out",
                                      "Broken pipe")
    )


def checkpoint_state(model: torch.nn.Module, optimizer, cfg: TrainConfig, ctx: DistContext, loader_len: int,
                     logs: list, step: int, epoch: int) -> dict:
    """Everything an exact resume needs, in plain tensors and containers (weights_only-safe)."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "position_in_epoch": step - epoch * loader_len,
        "rng": checkpoint.rng_state(),
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "logs": [entry.to_dict() for entry in logs],
    }
