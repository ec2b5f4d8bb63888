"""One line saying which rank stopped the check, in which step, and the last thing it did.

Every rank writes where it is to a file as it goes (``trace.Progress``): the target, the step, the
last thing it did (a forward, ``optimizer.step()``, a collective the step called), and the
exception's last line if it raised. When a world size fails, one rank is to blame and the others
are only waiting for it. The rank named is, in this order: one whose step called a collective the
others never joined; the first that raised something other than a peer's time-out (the others then
fail or wait on it); else, of the ranks that did not raise, the one whose progress stopped earliest
(the others went on until they waited for it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

GRACE_S = 2.0  # after a rank raised, how long the others may show no progress before the check stops them


def read_progress(folder: str, world_size: int) -> list[dict]:
    states = []
    for r in range(world_size):
        path = Path(folder) / f"rank{r}.json"
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            states.append({"rank": r, "target": "", "step": 0, "last": "never started", "raised": None, "time": 0.0})
    return states


# gloo's words when a collective gave up on a peer: the rank that says them only waited. A rank that
# never returns makes the others' collectives time out at the process group's timeout, which can come
# before the check's own deadline on a loaded machine; the one to name is then the rank that stalled.
WAITED = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def _waited(state: dict) -> bool:
    return any(words in (state.get("raised") or "") for words in WAITED)


def culprit(states: list[dict]) -> dict:
    alone = [s for s in states if s["last"].startswith("dist.")]
    if len(alone) == 1:
        return alone[0]
    raised = [s for s in states if s.get("raised") and not _waited(s)]
    if raised:
        return min(raised, key=lambda s: s["time"])
    behind = [s for s in states if not s.get("raised")] or states
    return min(behind, key=lambda s: (s.get("events", 0), s["time"], s["rank"]))  # the one behind the others


def others_wait(folder: str, world_size: int) -> bool:
    """A rank raised in a target more than GRACE_S ago, and another rank of that world size that did not
    raise there has shown no progress since: it waits for the first in a collective that will never come."""
    states, now = read_progress(folder, world_size), time.time()
    raised = [s for s in states if s.get("raised_at") and now - s["raised_at"] > GRACE_S]
    return any(o.get("world") == s["world_raised"] and o.get("raised_in") != s["raised_in"]
               and now - o["time"] > GRACE_S and o["time"] - s["raised_at"] < GRACE_S for s in raised for o in states)


def quiet(folder: str | None, rank: int) -> None:
    """A worker's stderr (gloo's C++ aborts included) goes to a file beside its progress: the user
    sees the one line, not N tracebacks (--json keeps them)."""
    if folder:
        err = open(Path(folder) / f"rank{rank}.err", "w")  # noqa: SIM115 (open for the process's life)
        os.dup2(err.fileno(), 2)
        sys.stderr = err


def one_line(states: list[dict], timeout: float | None = None) -> str:
    """``rank 1 raised in step 2 of T: ValueError: ... (last: forward of micro-batch 1)``, or
    ``rank 0 did not finish step 2 of T within --timeout 20 s (last: dist.all_reduce called by the step)``."""
    s = culprit(states)
    at = f"at N={s['world']}: " if s.get("world") else ""
    where = f"step {s['step']} of {s['target']}" if s["step"] else f"{s['target'] or 'start-up'}, before the first step"
    if s.get("raised"):
        return f"{at}rank {s['rank']} raised in {where}: {s['raised']} (last: {s['last']})"
    limit = f" within --timeout {timeout:g} s" if timeout else ""
    return f"{at}rank {s['rank']} did not finish {where}{limit} (last: {s['last']})"


def where_stopped(folder: str, world_size: int, timeout: float | None, error: str) -> str:
    """The one line, then what the processes said (``error``)."""
    states = read_progress(folder, world_size)
    if all(s["last"] == "never started" for s in states):  # the processes died starting: their own words
        return error
    return f"{one_line(states, timeout)}\n{error}"
