"""Every strategy's sharded checkpoint, resumed at every world size under every strategy.

    /work/venv/bin/python launch/reshard_matrix.py [--sizes 1 2 3 4] [--parallel 3]   # from the repository root

The job of tests/test_resharding.py (float64, Adam, 51 samples, global batch 12, 10 steps,
a sharded checkpoint every 2 steps). For each strategy S, a torchrun job at N = 2 under S is
SIGKILLed after step 7 (``--inject-fault kill:1:7``), leaving step 6 as its newest checkpoint.
A copy of it is then resumed under every strategy R at every world size M. Each row: the
largest difference of the resumed ``final.pt`` from one uninterrupted process, whether the run
took its first 6 steps from the checkpoint, and whether every step after it trained on the same
global batch as that process, split evenly over M ranks with no sample twice. Exit 1 if any row
misses WHOLE_RUN (1e-10) or the data check. The suite runs four of these pairs; this runs all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ddp_demo.core.tolerances import WHOLE_RUN  # noqa: E402

STRATEGIES = ("ddp", "zero", "fsdp")
BASE = ["--dtype", "float64", "--global-batch-size", "12", "--optimizer", "adam", "--lr", "0.01", "--steps", "10",
        "--checkpoint-every", "2", "--keep-last", "20", "--checkpoint-format", "sharded", "--record-samples",
        "--timeout", "120"]


def launch(n: int, flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
    runner = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={n}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*runner, "-m", "ddp_demo.train", *flags], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check(d: Path, ref: Path, m: int, logged: list[dict]) -> tuple[float, bool, bool]:
    a, b = (torch.load(p / "final.pt", weights_only=True) for p in (d / "out", ref))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    rows, want = rows_of(d / "out"), rows_of(ref)
    continued = rows[: len(logged)] == logged
    data_ok = len(rows) == len(want)
    for row, w in zip(rows, want, strict=False):
        shares, n = row["sample_ids"], (2 if row["step"] <= 6 else m)
        same_batch = sorted(sum(shares, [])) == sorted(sum(w["sample_ids"], []))
        data_ok &= [len(s) for s in shares] == [12 // n] * n and same_batch
    return diff, continued, data_ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 3, 4], help="world sizes to resume at")
    p.add_argument("--parallel", type=int, default=3, help="resumed jobs run at once")
    args = p.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(64, 10, generator=g)
        torch.save((x, (x[:, 0] > 0).long()), data := d / "xy.pt")
        job = [*BASE, "--data", str(data)]
        assert launch(1, [*job, "--out", str(d / "ref")], d).returncode == 0
        for s in STRATEGIES:
            launch(2, [*job, "--strategy", s, "--out", str(d / s / "out"), "--checkpoint-dir", str(d / s / "ckpt"),
                       "--inject-fault", "kill:1:7"], d)
            assert (d / s / "ckpt" / "step-000006").is_dir(), f"{s}: no step 6 checkpoint"

        def resume(case: tuple[str, str, int]) -> str:
            s, r, m = case
            c = d / f"{s}2-{r}{m}"
            shutil.copytree(d / s / "ckpt", c / "ckpt")
            logged = torch.load(c / "ckpt" / "step-000006" / "meta.pt", weights_only=True)["logs"]
            proc = launch(m, [*job, "--strategy", r, "--out", str(c / "out"), "--checkpoint-dir", str(c / "ckpt")], d)
            if proc.returncode != 0:
                return f"| {s} 2 | {r} {m} | FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1]} |"
            diff, continued, data_ok = check(c, d / "ref", m, logged)
            ok = diff <= WHOLE_RUN and continued and data_ok
            return f"| {s} 2 | {r} {m} | {diff:.1e} | {continued} | {data_ok} | {'PASS' if ok else 'FAIL'} |"

        cases = [(s, r, m) for s in STRATEGIES for r in STRATEGIES for m in args.sizes]
        print("| saved by, N | resumed by, M | max diff from one process | resumed, not redone | same global batches |"
              " verdict |\n|---|---|---|---|---|---|", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            lines = list(pool.map(resume, cases))
    print("\n".join(lines))
    print(f"{sum('PASS' in line for line in lines)} of {len(lines)} pass; {time.monotonic() - started:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0 if all("PASS" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
