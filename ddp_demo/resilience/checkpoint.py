"""Checkpoints that a crash cannot corrupt and a resume can trust.

A checkpoint is two files in ``--checkpoint-dir``: ``step-000120.pt`` and, written
after it, ``step-000120.pt.sha256``. Each is written atomically (temporary name,
fsync, rename), so a checkpoint without its checksum is one whose writer died, and a
checksum mismatch is a damaged file; both are reported and skipped in favour of the
previous checkpoint. Files are read with ``torch.load(weights_only=True)``: loading a
checkpoint cannot run code.

Only global rank 0 writes; the caller makes the other ranks wait at a barrier. A sharded
checkpoint (every rank writes, resharded on load: ``--checkpoint-format sharded``, the default
under zero and fsdp) is a directory ``step-000120/`` instead (resilience/sharded.py); this module
lists, verifies and prunes both kinds, so a run can resume from either.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp_demo.core.config import ConfigError
from ddp_demo.core.outputs import atomic_write
from ddp_demo.resilience import sharded

NAME = re.compile(r"^step-(\d{6,})(\.pt)?$")  # step-000120.pt: one file; step-000120: a sharded directory
# Settings a checkpoint must share with the run that resumes it; others (steps, lr, out,
# timeout, logging, checkpoint cadence) may change between attempts.
MUST_MATCH = ("model", "dtype", "optimizer", "seed", "global_batch_size", "data", "grad_accum_steps")


@dataclass
class Found:
    path: Path
    state: dict  # a sharded checkpoint's is its meta.pt: everything but the tensors, read after wrapping
    skipped: list[str]  # one line per newer checkpoint that was unusable

    @property
    def sharded(self) -> bool:
        return self.path.is_dir()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_random_state(s) -> tuple:
    """random.getstate() is (version, tuple_of_ints, gauss); a load may give lists."""
    return (s[0], tuple(s[1]), s[2])


def save(directory: str, step: int, state: dict, keep_last: int) -> Path:
    """Write ``state`` as the checkpoint for ``step`` and prune to the newest ``keep_last``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step:06d}.pt"
    write_file(path, state)
    prune(d, keep_last)
    return path


def write_file(path: Path, state: dict) -> None:
    """The checkpoint file, then its checksum, each atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write(path, lambda p: p.write_bytes(data))
    atomic_write(_sum_path(path), lambda p: p.write_text(hashlib.sha256(data).hexdigest() + "\n"))


def prune(directory: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints of either kind."""
    for old in checkpoints(directory)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old)
            continue
        _sum_path(old).unlink(missing_ok=True)
        old.unlink(missing_ok=True)


def checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in step order, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = (p for p in d.iterdir() if (m := NAME.match(p.name)) and p.is_dir() == (m[2] is None))
    return sorted(found, key=lambda p: int(NAME.match(p.name)[1]))


def load(path: str | Path) -> dict:
    """Read and verify one checkpoint; raise ValueError naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        return sharded.verify(path)
    data = path.read_bytes()
    sum_file = _sum_path(path)
    if not sum_file.exists():
        raise ValueError(f"{path.name} has no checksum file (its writer was interrupted)")
    if hashlib.sha256(data).hexdigest() != sum_file.read_text().strip():
        raise ValueError(f"{path.name} does not match its checksum (truncated or corrupted)")
    return torch.load(io.BytesIO(data), weights_only=True)


def newest_valid(directory: str) -> Found | None:
    """The newest checkpoint that verifies, plus a line for each newer one that did not."""
    skipped = []
    for path in reversed(checkpoints(directory)):
        try:
            return Found(path, load(path), skipped)
        except sharded.NewerFormat as e:  # not skipped: resuming an older one would prune it later
            raise ConfigError(str(e)) from None
        except Exception as e:  # ValueError from load, or an unreadable torch file
            skipped.append(f"skipping checkpoint {path}: {e}")
    return None


def check_compatible(state: dict, config: dict, path: Path) -> None:
    """A checkpoint from another model or setup cannot be resumed: say which setting differs."""
    saved = state.get("config", {})
    for key in MUST_MATCH:
        if saved.get(key) != config.get(key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"checkpoint {path} was made with {flag} {saved.get(key)!r}, this run has {config.get(key)!r}; "
                f"use the same {flag}, another --checkpoint-dir, or --resume never"
            )


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
