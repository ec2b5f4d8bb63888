"""What Ray costs: the same small job under torchrun and under Ray Train, timed and weighed.

    /work/venv/bin/python launch/ray_cost.py [--workers 2] [--repeats 2]     # from the repository root

Each launch runs ``ddp_demo.train``'s job (the flags below) to the end, torchrun and Ray
alternating so that a change in background load hits both. The wall clock around the command
and rank 0's summary.json timeline split it into phases (ddp_demo.bench.command.phases):
"launcher + imports" is everything before the trainer's main() runs on rank 0, which under Ray
includes starting the cluster and the worker group. Memory: every 0.2 s the proportional set
size (PSS, so shared pages count once) of every process of the command (its session, and
anything started below it) is summed; the table gives the peak of that sum and how many
processes there were. Prints a Markdown table and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddp_demo.bench.command import PHASES, phases  # noqa: E402

JOB = ["--model", "mlp", "--dtype", "float64", "--steps", "30", "--global-batch-size", "16", "--seed", "5"]


def commands(workers: int) -> dict[str, list[str]]:
    return {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={workers}", "-m", "ddp_demo.train"],
            "ray": [sys.executable, "-m", "ddp_demo.train_ray", "--workers", str(workers)]}


def family(leader: int) -> list[int]:
    """The leader's session, and every process whose parent chain reaches the leader."""
    parents, sessions = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            parents[int(entry)], sessions[int(entry)] = int(fields[1]), int(fields[3])
    found = []
    for pid in parents:
        p = pid
        while p > 1 and p != leader:
            p = parents.get(p, 0)
        if p == leader or sessions[pid] == leader:
            found.append(pid)
    return found


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch(threading.Thread):
    """Samples the command's summed PSS until stopped; keeps the peak and the most processes."""

    def __init__(self, leader: int):
        super().__init__(daemon=True)
        self.leader, self.peak_kib, self.most = leader, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            pids = family(self.leader)
            self.peak_kib = max(self.peak_kib, sum(pss_kib(p) for p in pids))
            self.most = max(self.most, len(pids))


def launch(cmd: list[str], out: Path, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.Popen([*cmd, *JOB, "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    watch = MemoryWatch(proc.pid)
    watch.start()
    _, err = proc.communicate(timeout=timeout)
    end = time.time()
    watch.done.set()
    watch.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-2000:]}")
    summary = out / "summary.json"
    row = phases(start, end, json.loads(summary.read_text())["timeline"], summary.stat().st_mtime)
    return {**row, "wall": end - start, "peak MiB": watch.peak_kib / 1024, "processes": watch.most}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/ray_cost.py", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    rows = {name: [] for name in commands(args.workers)}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = list(commands(args.workers).items())
            for name, cmd in order if i % 2 == 0 else order[::-1]:
                rows[name].append(launch(cmd, Path(tmp) / f"{name}-{i}", timeout=600))
    columns = ("wall", *PHASES, "peak MiB", "processes")
    print(f"{args.workers} workers, {args.repeats} launches each, median (min-max); job: {' '.join(JOB)}\n")
    print("| launcher | " + " | ".join(c + (" s" if c in PHASES or c == "wall" else "") for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, runs in rows.items():
        cells = [cell([r[c] for r in runs], c) for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nload average (1, 5, 15 min) before: {fmt(load_before)}; after: {fmt(os.getloadavg())}; "
          f"{os.cpu_count()} CPUs")
    return 0


def cell(values: list[float], column: str) -> str:
    digits = 0 if column in ("peak MiB", "processes") else 1
    median = statistics.median(values)
    return f"{median:.{digits}f}" + (f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else "")


def fmt(load: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
