"""``python -m ddp_demo.doctor``: print every check's verdict and fix; exit 0, 1 (a check failed) or 2 (bad input).

The variables it reads come from core/env.py (``launch_variables``), torch-free like the doctor."""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass

from ddp_demo.core.env import launch_variables
from ddp_demo.core.flags import add_options, option
from ddp_demo.doctor.checks import run_checks
from ddp_demo.doctor.plan import Check, LaunchPlan, plan_from_env

VARIABLES = """environment variables read (launch/multinode.sh's; unset or empty means its default):
  NNODES              nodes in the job, N or MIN:MAX for an elastic job [1; 2 when RDZV_HOST is set]
  NPROC_PER_NODE      processes per node [1]
  NODE_RANK           this node's rank; node 0 hosts the rendezvous store
  RDZV_HOST, RDZV_PORT  where node 0's rendezvous store listens [port 29400]
  LOCAL_ADDR          the address this node advertises to the others
  GLOO_SOCKET_IFNAME  the network interface(s) gloo uses, e.g. eth0
  MASTER_ADDR, MASTER_PORT  the store of a launch without rendezvous (srun, a hand-set job)
  MAX_RESTARTS        torchrun's --max-restarts [0]

example:
  NNODES=2 NODE_RANK=0 RDZV_HOST=10.0.0.1 python -m ddp_demo.doctor --world-size 4
exit status: 0 every check passed, 1 a check failed (its fix is printed), 2 bad input"""


@dataclass(frozen=True)
class DoctorOptions:
    device: str = option("auto", "the device the trainer will use", ("auto", "cpu", "cuda"), parse_choices=True)
    backend: str = option("auto", "the process-group backend", ("auto", "gloo", "nccl"), parse_choices=True)
    world_size: int | None = option(None, "the world size the job must have", type_=int)
    # Two trainer flags matter to a membership change (membership.py); the others are accepted and
    # ignored, so a launch script can hand both the same ones.
    checkpoint_dir: str | None = option(None, "the trainer's --checkpoint-dir: where a restart resumes from",
                                        type_=str)
    global_batch_size: int | None = option(None, "the trainer's: every world size must divide it", type_=int)


def where(plan: LaunchPlan) -> str:
    """``node 0 of 2``; a one-node launch with no NODE_RANK is just ``one node``."""
    if plan.node_rank is not None:
        return f"node {plan.node_rank} of {plan.nnodes_text}"
    return "one node" if not plan.multinode else f"one of {plan.nnodes_text} nodes (NODE_RANK unset)"


def report(plan: LaunchPlan, found: list[Check]) -> str:
    lines = [f"ddp_demo doctor: {where(plan)}, {plan.nproc_per_node or 1} process(es) per node, "
             f"host {socket.gethostname()}"]
    for c in found:
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<18} {c.verdict}")
        if not c.ok:
            lines.append(f"        {'':<18} fix: {c.fix}")
    failed = sum(not c.ok for c in found)
    lines.append(f"{len(found) - failed} of {len(found)} checks passed" + (f"; {failed} failed" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.doctor", epilog=VARIABLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Check a (multi-node) launch before it: run on every node, with "
                                     "the variables launch/multinode.sh will read. Unknown flags (the trainer's) "
                                     "are ignored.")
    known, _ = add_options(parser, DoctorOptions).parse_known_args(argv)
    args = DoctorOptions(**vars(known))
    try:
        plan = plan_from_env(launch_variables(), device=args.device, backend=args.backend, world_size=args.world_size,
                             checkpoint_dir=args.checkpoint_dir, global_batch_size=args.global_batch_size)
    except ValueError as e:
        print(f"ddp_demo.doctor: error: {e}", file=sys.stderr)
        return 2
    found = run_checks(plan)
    print(report(plan, found), flush=True)
    return 0 if all(c.ok for c in found) else 1
