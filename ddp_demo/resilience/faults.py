"""``--inject-fault KIND:RANK:STEP``: kill or freeze one rank on purpose, for tests and demos.

Kept apart from checkpointing so that the code which saves work never also destroys it.
A fault strikes the first attempt only: the restarted attempt must be able to finish.
"""

from __future__ import annotations

import os
import signal

from ddp_demo.core import log
from ddp_demo.core.config import TrainConfig


class FaultInjector:
    """Called after each applied step; on the chosen rank and step it sends itself the signal."""

    def __init__(self, cfg: TrainConfig, rank: int, restart_count: int):
        self.fault = cfg.fault() if restart_count == 0 else None
        self.rank = rank

    def __call__(self, step: int) -> None:
        if self.fault and self.fault[1] == self.rank and self.fault[2] == step:
            kind = self.fault[0]
            log.each(self.rank, f"injecting fault {kind} at step {step}", True)
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
