"""Stopping on request, and telling a lost peer from a bug."""

from __future__ import annotations

import signal
import threading

import torch.distributed as dist


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at the next step.

    Raising from the handler instead could leave one rank inside a collective its peers
    never enter. A second signal falls back to the default behaviour (stop now).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, listen: bool = True):
        """``listen=False``: no handler is installed and nothing ever asks to stop (a run
        started in-process by a test or a proof, not by ``main``)."""
        self.received: int | None = None
        self._previous = {}
        if listen and threading.current_thread() is threading.main_thread():
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
