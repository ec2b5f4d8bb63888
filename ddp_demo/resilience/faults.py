"""``--inject-fault KIND:RANK:STEP[:ATTEMPT]``: kill, freeze or hold one rank on purpose, for tests and demos.

Kept apart from checkpointing so that the code which saves work never also destroys it.
A fault strikes one attempt only, the first unless ATTEMPT names another (torchrun's
``TORCHELASTIC_RESTART_COUNT``, which each node's agent counts for itself): the attempts after
it must be able to finish. It strikes once step STEP is applied and, if STEP is a checkpoint
step, saved.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from ddp_demo.core import log
from ddp_demo.core.config import TrainConfig

PAUSE_POLL_S = 0.05


class FaultInjector:
    """Called after each applied step; on the chosen rank and step it strikes.

    ``kill`` sends SIGKILL to itself, ``hang`` SIGSTOP. ``pause`` holds the run at a known
    step, as a long step would, until a stop signal arrives (its agent restarting the group
    because a node joins) or ``--timeout`` seconds pass: the membership tests change the
    job's nodes there without racing a run that might already have finished (docs/elastic.md).
    """

    def __init__(self, cfg: TrainConfig, rank: int, restart_count: int, stop: Callable[[], bool] = lambda: False):
        fault = cfg.fault()
        self.fault = fault if fault and fault[3] == restart_count else None
        self.rank, self.stop, self.pause_s = rank, stop, cfg.timeout

    def __call__(self, step: int) -> None:
        if not (self.fault and self.fault[1] == self.rank and self.fault[2] == step):
            return
        kind = self.fault[0]
        log.each(self.rank, f"injecting fault {kind} at step {step}", True)
        if kind == "pause":
            deadline = time.monotonic() + self.pause_s
            while not self.stop() and time.monotonic() < deadline:
                time.sleep(PAUSE_POLL_S)
            return
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
