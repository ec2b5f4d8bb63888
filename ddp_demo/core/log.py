"""Quiet by default: rank 0 speaks, other ranks only when asked, prefixed ``[rank N]``."""

from __future__ import annotations

import sys


def info(rank: int, message: str) -> None:
    """Rank 0 only."""
    if rank == 0:
        print(message, flush=True)


def each(rank: int, message: str, enabled: bool) -> None:
    """Every rank, prefixed, only when asked for (``--log-all-ranks``)."""
    if enabled:
        print(f"[rank {rank}] {message}", flush=True)


def error(rank: int, message: str) -> None:
    """One line on stderr, from rank 0 only: every rank sees the same bad input."""
    if rank == 0:
        print(f"ddp_demo: error: {message}", file=sys.stderr, flush=True)
