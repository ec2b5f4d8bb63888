"""Writing results: every file appears whole or not at all.

Each file is written to a temporary name in the same directory, flushed to disk and
renamed over the target (``os.replace`` is atomic on POSIX), so a crash never leaves a
half-written ``final.pt`` that a later run or a reader would trust.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddp_demo.core.config import ConfigError, TrainConfig
from ddp_demo.core.dist import DistContext


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Fail early (before any training) if a directory flag can never be written."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{flag} {path}: {p} is a file, not a directory; pick another {flag}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {p} is not writable; pick a writable {flag}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunRecord:
    """Who launched a run and when its phases ended (``time.time()`` on rank 0; bench.command
    splits a run with them): summary.json's ``launcher``, ``wall_time_s`` and ``timeline``."""

    def __init__(self, launcher: str, main_started: float):
        self.launcher, self.start = launcher, time.perf_counter()
        self.timeline = {"main_started": main_started}

    def mark(self, phase: str) -> None:
        self.timeline[phase] = time.time()

    def summary(self, cfg: TrainConfig, ctx: DistContext, results: dict) -> dict:
        """summary.json: what ran and where, what it reached (``results``), and when."""
        where = {"world_size": ctx.world_size, "launcher": self.launcher, "backend": ctx.backend,
                 "device": ctx.device.type, "torch_version": torch.__version__}
        return {"config": cfg.to_dict(), **where, **results,
                "wall_time_s": round(time.perf_counter() - self.start, 3), "timeline": self.timeline}


def write_outputs(out: str, state_dict: dict, metrics: list[dict], summary: dict) -> None:
    """final.pt (plain state_dict), metrics.jsonl (a line per step), summary.json."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(d / "final.pt", lambda p: torch.save(state_dict, p))
    atomic_write(d / "metrics.jsonl", lambda p: p.write_text(lines))
    atomic_write(d / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
