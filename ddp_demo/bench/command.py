"""The whole default command, as a user runs it, split into phases, under each allocator.

``launch/torchrun.sh`` (2 processes, ``ddp_demo.train``'s defaults, only ``--out`` added)
runs ``launches`` times per allocator, the allocators alternating so that a change in
background load hits all of them. Rank 0's ``summary.json`` holds a timeline
(``time.time()`` as each phase ended); with the wall clock around the command that splits
it into:

- launcher + imports: the command starts, torchrun starts the workers, they import torch;
- set-up: flags, data, the process group, the model and DDP;
- training: the steps;
- final checks: the ranks' parameters compared, the held-out accuracy;
- writing + exit: ``final.pt``, ``metrics.jsonl``, ``summary.json``, teardown, exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddp_demo.bench.launchers import ROOT

PHASES = ("launcher + imports", "set-up", "training", "final checks", "writing + exit")
LIBS = Path("/usr/lib/x86_64-linux-gnu")  # where Debian's libjemalloc2 and libtcmalloc-minimal4 put them


def allocators() -> dict[str, tuple[dict[str, str], list[str]]]:
    """name -> (environment, trainer flags). jemalloc and tcmalloc only where installed."""
    out = {"glibc default": ({}, ["--malloc", "default"]), "glibc, keep freed memory": ({}, ["--malloc", "keep"])}
    for name, lib in (("jemalloc", "libjemalloc.so.2"), ("tcmalloc", "libtcmalloc_minimal.so.4")):
        if (LIBS / lib).exists():
            out[name] = ({"LD_PRELOAD": str(LIBS / lib)}, ["--malloc", "default"])
    return out
MARKS = ("main_started", "training_started", "training_ended", "checks_ended")


def phases(start: float, end: float, timeline: dict) -> dict[str, float]:
    marks = [start, *(timeline[m] for m in MARKS), end]
    return {name: b - a for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}


def launch_once(flags: list[str], env: dict[str, str], out: Path, timeout: float) -> dict[str, float]:
    """One run of ``launch/torchrun.sh`` with ``env`` added; its phases in seconds."""
    full = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", **env}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(var, None)
    start = time.time()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), *flags, "--out", str(out)], env=full,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"launch/torchrun.sh {' '.join(flags)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return phases(start, end, json.loads((out / "summary.json").read_text())["timeline"])


def compare(jobs: dict[str, list[str]], settings: dict[str, tuple[dict, list[str]]], launches: int, bar,
            timeout: float = 300.0) -> dict:
    """``{job: {allocator: {phase: [seconds per launch]}}}``, the allocators alternated."""
    runs = {job: {name: {p: [] for p in PHASES} for name in settings} for job in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(launches):
            order = list(settings.items())
            for job, flags in jobs.items():
                for name, (env, extra) in order if i % 2 == 0 else order[::-1]:
                    out = Path(tmp) / f"{job}-{i}-{len(runs[job][name]['training'])}-{name.split()[0]}"
                    for phase, seconds in launch_once([*flags, *extra], env, out, timeout).items():
                        runs[job][name][phase].append(seconds)
                    bar.step(f"{job}, {name}, launch {i + 1}")
    return {"jobs": jobs, "allocators": settings, "runs": runs}
