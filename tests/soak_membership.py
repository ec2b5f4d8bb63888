"""The membership soak (launch/soak_membership.sh): RUNS two-host jobs, each changing its nodes
at a random checkpoint step — node 1 leaves, joins, or leaves and is replaced at once — and
each must end with the weights one uninterrupted process trains (float64, within 1e-10).

    python -m tests.soak_membership [RUNS] [--seed S] [--kinds leave,join,replace]   (as root, from the repo root)
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from ddp_demo import train as trainer
from ddp_demo.core.tolerances import WHOLE_RUN

from . import elastic_jobs as jobs
from .nodes import two_hosts

STEPS = 24  # 8 epochs of 3 steps; the change at a checkpoint step (every 3) between 3 and 21
# kind -> (scenario, the rank its pause holds at the change)
KINDS = {"leave": (jobs.leave, 1), "join": (jobs.join, 0), "replace": (jobs.replace, 1)}


def one_run(kind: str, at: int, data: Path, reference: Path, workdir: Path) -> str:
    """Run one job; return its verdict line."""
    scenario, paused = KINDS[kind]
    flags = [*jobs.train_flags(data, STEPS), "--inject-fault", f"pause:{paused}:{at}", "--timeout", "60"]
    start = time.monotonic()
    try:
        with two_hosts() as pair:
            o = scenario(pair, workdir, flags, jobs.elastic_env(), budget_s=300, at=at)
    except AssertionError as e:  # a wait ran past its deadline
        ok, verdict = False, str(e).splitlines()[0]
    else:
        ok, verdict = judge(kind, o, reference)
    return f"{kind} at step {at}: {verdict}, {time.monotonic() - start:.0f} s: {'ok' if ok else 'FAILED'}"


def judge(kind: str, o: jobs.Outcome, reference: Path) -> tuple[bool, str]:
    said = f"exit {o.codes}, world sizes {o.timeline}"
    if not (o.out / "final.pt").exists():
        errors = [line for line in o.stderr[0].splitlines() if "Error" in line or "error:" in line]
        return False, f"{said}, no final.pt; node 0 said: {errors[-1] if errors else 'no error'}"
    diff = jobs.trained_alike(o.out, reference)
    ok = diff <= WHOLE_RUN and o.codes[0] == 0 and (kind == "leave" or o.codes[1] == 0)
    return ok, f"{said}, max |difference| {diff:.2g}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests.soak_membership", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=10, help="how many jobs [default: 10]")
    parser.add_argument("--seed", type=int, help="seed the random kinds and steps (to repeat a soak)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"draw from these [default: {','.join(KINDS)}]")
    args = parser.parse_args()
    kinds = sorted(args.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds {args.kinds}: use some of {', '.join(KINDS)}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        data = jobs.write_data(d / "xy.pt")
        assert trainer.main([*jobs.train_flags(data, STEPS), "--out", str(d / "reference")]) == 0
        failed = 0
        for i in range(1, args.runs + 1):
            kind, at = rng.choice(kinds), 3 * rng.randint(1, STEPS // 3 - 1)
            line = one_run(kind, at, data, d / "reference", d / f"run{i}")
            failed += line.endswith("FAILED")
            print(f"run {i}: {line}", flush=True)
    print(f"{args.runs - failed} of {args.runs} membership changes ended equal to the uninterrupted run")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
