"""One line saying which rank stopped the check, in which step, and the last thing it did.

Every rank writes where it is to a file as it goes (``trace.Progress``): the target, the step, the
last thing it did (a forward, ``optimizer.step()``, a collective the step called), and the
exception's last line if it raised. When a world size fails, one rank is to blame and the others
are only waiting for it. The rank named is, in this order: the first that raised (the others then
fail or wait on it); one whose step called a collective the others never joined; else the one whose
progress stopped earliest (the others went on until they waited for it).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_progress(folder: str, world_size: int) -> list[dict]:
    states = []
    for r in range(world_size):
        path = Path(folder) / f"rank{r}.json"
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            states.append({"rank": r, "target": "", "step": 0, "last": "never started", "raised": None, "time": 0.0})
    return states


def culprit(states: list[dict]) -> dict:
    raised = [s for s in states if s.get("raised")]
    if raised:
        return min(raised, key=lambda s: s["time"])
    alone = [s for s in states if s["last"].startswith("dist.")]
    if len(alone) == 1:
        return alone[0]
    return min(states, key=lambda s: (s["time"], s["rank"]))


def one_line(states: list[dict], timeout: float | None = None) -> str:
    """``rank 1 raised in step 2 of T: ValueError: ... (last: forward of micro-batch 1)``, or
    ``rank 0 did not finish step 2 of T within --timeout 20 s (last: dist.all_reduce called by the step)``."""
    s = culprit(states)
    where = f"step {s['step']} of {s['target']}" if s["step"] else f"{s['target'] or 'start-up'}, before the first step"
    if s.get("raised"):
        return f"rank {s['rank']} raised in {where}: {s['raised']} (last: {s['last']})"
    return f"rank {s['rank']} did not finish {where} within --timeout {timeout:g} s (last: {s['last']})"


def where_stopped(folder: str, world_size: int, timeout: float, error: str) -> str:
    """The one line, then what the processes said (``error``)."""
    states = read_progress(folder, world_size)
    if all(s["last"] == "never started" for s in states):  # the processes died starting: their own words
        return error
    return f"{one_line(states, timeout)}\n{error}"
