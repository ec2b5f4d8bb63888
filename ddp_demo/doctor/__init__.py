"""Launch doctor: find the multi-node traps before torchrun hangs on them.

    python -m ddp_demo.doctor [--device cuda] [--world-size N]   # on every node, before the launch
    torchrun ... -m ddp_demo.train --preflight                    # the same checks in every worker

It reads the launch configuration the way ``launch/multinode.sh`` does: ``NNODES``,
``NPROC_PER_NODE``, ``NODE_RANK``, ``RDZV_HOST``, ``RDZV_PORT``, ``RDZV_EXTERNAL``, ``LOCAL_ADDR``,
``GLOO_SOCKET_IFNAME``, ``MASTER_ADDR``, ``MASTER_PORT``, ``MAX_RESTARTS`` (``NNODES`` may be a
range ``MIN:MAX``: membership.py checks what losing a node needs; ``RDZV_EXTERNAL=1``: the store
runs on a host that trains nothing, python -m ddp_demo.rendezvous). Each check prints a verdict
and, when it fails, the fix; the ``rendezvous`` check names the layout's single point of failure.
Exit 0 when every check passes, 1 otherwise, 2 on bad input.

It imports torch only to look for GPUs when CUDA is asked for, so it answers in a blink.
"""

from ddp_demo.doctor.checks import preflight, run_checks
from ddp_demo.doctor.plan import DEFAULT_RDZV_PORT, Check, LaunchPlan, LaunchProblem, plan_from_env

__all__ = ["DEFAULT_RDZV_PORT", "Check", "LaunchPlan", "LaunchProblem", "plan_from_env", "preflight", "run_checks"]
