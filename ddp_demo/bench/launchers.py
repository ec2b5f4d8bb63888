"""Accelerate vs torchrun on the same job, each launched as a user would launch it.

Both commands run ``ddp_demo.train``'s job (the CNN, global batch 64, 2 processes) through
the scripts in ``launch/``; the comparison uses the step times the trainer itself logs
on rank 0 (``metrics.jsonl``), so process start-up, imports and rendezvous, which
differ between the launchers but are paid once, are kept apart from the per-step cost.
The two launchers alternate (T A T A), so a change in background load hits both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: launch/ is there
JOB = ["--model", "cnn", "--global-batch-size", "64"]
GLOBAL_BATCH = 64
BLOCKS = 5  # repetitions per launch: the measured steps are cut into this many blocks


def commands(device: str) -> dict[str, list[str]]:
    accelerate = "accelerate_gpu.sh" if device == "cuda" else "accelerate_cpu.sh"
    return {"torchrun": ["bash", str(ROOT / "launch" / "torchrun.sh")],
            "accelerate": ["bash", str(ROOT / "launch" / accelerate)]}


def unavailable(device: str) -> str | None:
    """Why the comparison cannot run here (None: it can)."""
    missing = [c[1] for c in commands(device).values() if not Path(c[1]).exists()]
    if missing:
        return f"{', '.join(missing)} not found (run from a clone of the repository)"
    if importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed"
    if importlib.util.find_spec("ddp_demo.train_accelerate") is None:
        return "ddp_demo.train_accelerate is missing"
    return None


def block_step_times(metrics: Path, warmup: int) -> list[float]:
    """Mean seconds per step in each of ``BLOCKS`` equal blocks after the first ``warmup`` steps."""
    rates = [json.loads(line)["samples_per_s"] for line in metrics.read_text().splitlines() if line.strip()]
    seconds = [GLOBAL_BATCH / r for r in rates[warmup:]]
    size = len(seconds) // BLOCKS
    if size == 0:
        raise ValueError(f"{metrics}: {len(rates)} steps, too few for {BLOCKS} blocks after {warmup} warm-up steps")
    return [sum(seconds[i * size : (i + 1) * size]) / size for i in range(BLOCKS)]


def launch(cmd: list[str], steps: int, out: Path, timeout: float, malloc: str = "keep") -> float:
    """Run one job to completion; returns the whole command's wall time."""
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "2", "NPROC_PER_NODE": "2",
           "OMP_NUM_THREADS": "1"}  # one thread per rank, the same for both launchers
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *JOB, "--steps", str(steps), "--malloc", malloc, "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def compare(steps: int, launches: int, device: str, bar, timeout: float = 300.0,
            malloc: str = "keep") -> dict:
    """Block step times and wall times of ``launches`` launches per launcher, alternated."""
    reason = unavailable(device)
    if reason:
        for _ in range(2 * launches):
            bar.step("launchers skipped")
        return {"skipped": reason}
    warmup = max(2, steps // 10)
    result = {"job": " ".join([*JOB, "--steps", str(steps)]), "warmup_steps": warmup, "blocks_per_launch": BLOCKS}
    runs = {name: {"block_step_s": [], "wall_s": []} for name in commands(device)}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(launches):
            order = list(commands(device).items())
            for name, cmd in order if i % 2 == 0 else order[::-1]:
                out = Path(tmp) / f"{name}-{i}"
                runs[name]["wall_s"].append(launch(cmd, steps, out, timeout, malloc))
                runs[name]["block_step_s"] += block_step_times(out / "metrics.jsonl", warmup)
                bar.step(f"{name} launch {i + 1}")
    return result | runs
