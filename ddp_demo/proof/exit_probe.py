"""The smallest job that shows the gloo exit abort, with and without ddp_demo's teardown.

    torchrun --standalone --nproc_per_node=2 -m ddp_demo.proof.exit_probe [--no-teardown]

Three DDP forward/backward steps on a Linear layer, then exit. ``--no-teardown`` leaves
the process group to interpreter shutdown, as most scripts do; on torch 2.13 / 2.14
that aborts some launches with "terminate called without an active exception"
(see ``core/dist.py``, ``teardown``). ``launch/soak_exit.sh`` runs it many times and counts.
"""

import argparse
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.dist import setup, teardown
from ddp_demo.core.env import launch_env


def steps() -> None:
    model = DDP(torch.nn.Linear(10, 2))
    for _ in range(3):
        model(torch.randn(4, 10)).sum().backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp_demo.proof.exit_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--no-teardown", action="store_true", help="skip ddp_demo's teardown (shows the abort)")
    args = parser.parse_args(argv)
    setup(launch_env(), device="cpu", backend="gloo")
    if args.no_teardown:
        steps()
        return 0
    try:
        steps()
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
