"""Keep freed memory for reuse: the trainer's allocator setting (``--malloc``, issue 13).

By default glibc serves big blocks (from 128 KiB) with ``mmap`` and unmaps them when they
are freed, and trims the heap when its top is free. It raises those thresholds as it goes,
but a training step's mix of block sizes still makes it give back memory that the next
step touches again, one page fault per 4 KiB page: hundreds per CNN step on this project's
machine (``python -m ddp_demo.bench`` counts them). ``mallopt`` with both thresholds at 1 GiB
makes glibc keep freed memory for reuse (mallopt(3)); a step then reuses the same memory
every time. PyTorch's CPU performance tuning guide recommends jemalloc or tcmalloc for the
same reason; docs/performance.md has the measurements behind choosing this instead.

The cost: memory a run frees stays with the process until it exits (its peak, not more).
``--malloc default`` leaves glibc's own thresholds.
"""

from __future__ import annotations

import ctypes

MALLOC_CHOICES = ("keep", "default")
GIB = 1 << 30
KEEP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(GIB), "MALLOC_TRIM_THRESHOLD_": str(GIB)}  # the same, set from outside


def keep_freed_memory() -> bool:
    """Both thresholds at 1 GiB in this process; returns whether glibc accepted (False
    without glibc, e.g. on macOS or musl, where there is nothing to change)."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(m_mmap_threshold, GIB) == 1 and libc.mallopt(m_trim_threshold, GIB) == 1
    except (OSError, AttributeError):
        return False


def apply(choice: str) -> bool:
    """``--malloc keep``: keep freed memory; ``default``: change nothing. True if kept."""
    return choice == "keep" and keep_freed_memory()
