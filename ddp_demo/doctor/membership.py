"""Would the job survive losing a node? What a membership change needs, checked before the launch.

When a node is lost, the other nodes' workers fail in their next collective ("lost contact");
each agent then restarts its workers (one of ``--max-restarts``) and meets the others in a new
rendezvous, which ``--nnodes=MIN:MAX`` lets close with fewer nodes. The new workers resume from
the newest checkpoint, so it must be where every node can read it. docs/elastic.md shows each
step measured on two hosts.
"""

from __future__ import annotations

import os
from pathlib import Path

from ddp_demo.doctor.plan import Check, LaunchPlan

NAME = "node loss"
SHARED_DIR = "a directory on a filesystem every node mounts"


def _dir_problem(path: str) -> str | None:
    """None when this node can write (and so read back) checkpoints under ``path``."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            return f"--checkpoint-dir {path} is a file, not a directory"
        usable = os.access(target, os.R_OK | os.W_OK | os.X_OK)
        return None if usable else f"--checkpoint-dir {path} is not readable and writable here"
    parent = next(p for p in target.absolute().parents if p.exists())  # "/" always exists
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--checkpoint-dir {path} does not exist and {parent} is not writable here"
    return None


def _batch_problem(plan: LaunchPlan) -> str | None:
    """Every world size the job may shrink or grow to must split the global batch evenly."""
    if plan.global_batch_size is None:
        return None
    nproc = plan.nproc_per_node or 1
    bad = [n * nproc for n in plan.node_counts if plan.global_batch_size % (n * nproc)]
    if not bad:
        return None
    return f"--global-batch-size {plan.global_batch_size} does not divide by world size {bad[0]}"


def _problems(plan: LaunchPlan) -> list[tuple[str, str]]:
    """(what is wrong, the fix) for each thing a membership change needs and the launch lacks."""
    found = []
    if plan.elastic and plan.max_restarts == 0:
        found.append((f"NNODES={plan.nnodes_text} but MAX_RESTARTS=0: when a node is lost the other nodes' "
                      "workers fail and nothing restarts them", "set MAX_RESTARTS=3 (a node joining uses none up)"))
    if not plan.checkpoint_dir:
        found.append(("no --checkpoint-dir: a restart would train again from step 0",
                      f"pass --checkpoint-dir with {SHARED_DIR}"))
    elif problem := _dir_problem(plan.checkpoint_dir):
        found.append((problem, f"pass --checkpoint-dir with {SHARED_DIR}"))
    if problem := _batch_problem(plan):
        found.append((problem, "use a --global-batch-size every world size in NNODES x NPROC_PER_NODE divides"))
    return found


def check_node_loss(plan: LaunchPlan) -> Check:
    """Fails only a launch that asks for elasticity (a range, or restarts) but lacks what it needs."""
    if not plan.elastic and plan.max_restarts == 0:
        return Check(NAME, True, f"NNODES={plan.nnodes_text}, no restarts: a lost node ends the job (to go on "
                     "without it: NNODES=MIN:MAX, MAX_RESTARTS>0, a shared --checkpoint-dir)")
    problems = _problems(plan)
    if problems:
        return Check(NAME, False, "; ".join(p for p, _ in problems), "; ".join(f for _, f in problems))
    keeps = (f"goes on with {plan.min_nodes} to {plan.nnodes} nodes" if plan.elastic
             else f"waits (rendezvous join_timeout) for a node to replace a lost one, NNODES={plan.nnodes_text}")
    stays = "the store's host" if plan.external_store else "node 0, which hosts the rendezvous store,"
    return Check(NAME, True, f"{keeps}, MAX_RESTARTS={plan.max_restarts}, checkpoints in {plan.checkpoint_dir} "
                 f"(every node must see them; {stays} must stay)")
