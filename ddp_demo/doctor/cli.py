"""``python -m ddp_demo.doctor``: print every check's verdict and fix; exit 0, 1 (a check failed) or 2 (bad input)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ddp_demo.doctor.checks import run_checks
from ddp_demo.doctor.plan import Check, LaunchPlan, plan_from_env


def report(plan: LaunchPlan, found: list[Check]) -> str:
    where = f"node {plan.node_rank if plan.node_rank is not None else '?'} of {plan.nnodes_text}"
    lines = [f"ddp_demo doctor: {where}, {plan.nproc_per_node or 1} process(es) per node, host {socket.gethostname()}"]
    for c in found:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<18} {c.verdict}")
        if not c.ok:
            lines.append(f"        {'':<18} fix: {c.fix}")
    failed = sum(not c.ok for c in found)
    lines.append(f"{len(found) - failed} of {len(found)} checks passed" + (f"; {failed} failed" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp_demo.doctor", description="Check a (multi-node) launch before it.")
    parser.add_argument("--device", default="auto", help="the device the trainer will use (auto|cpu|cuda)")
    parser.add_argument("--backend", default="auto", help="the process-group backend (auto|gloo|nccl)")
    parser.add_argument("--world-size", type=int, help="the world size the job must have")
    # Two trainer flags matter to a membership change (membership.py); the others are accepted and
    # ignored, so a launch script can hand both the same ones.
    parser.add_argument("--checkpoint-dir", help="the trainer's --checkpoint-dir: where a restart resumes from")
    parser.add_argument("--global-batch-size", type=int, help="the trainer's: every world size must divide it")
    args, _ = parser.parse_known_args(argv)
    try:
        # The one reader outside core/dist.py (tests/test_launch_env.py allows it): the doctor answers
        # without importing torch (docs/multinode.md), and core/dist.py imports torch. What it reads
        # is launch/multinode.sh's input, on a node no launcher has started yet.
        plan = plan_from_env(dict(os.environ), device=args.device, backend=args.backend, world_size=args.world_size,
                             checkpoint_dir=args.checkpoint_dir, global_batch_size=args.global_batch_size)
    except ValueError as e:
        print(f"ddp_demo.doctor: error: {e}", file=sys.stderr)
        return 2
    found = run_checks(plan)
    print(report(plan, found), flush=True)
    return 0 if all(c.ok for c in found) else 1


