"""Steps that stop on one rank: the check ends within ``--timeout`` and names the rank, the step and
the last thing it did, exit 2, with no process left behind.

    python -m ddp_demo.check examples/check/hangs.py:raises_on_one_rank --world-sizes 2      # exit 2
    python -m ddp_demo.check examples/check/hangs.py:collective_on_one_rank --world-sizes 2 --timeout 10
    python -m ddp_demo.check examples/check/hangs.py:never_returns --world-sizes 2 --timeout 10

Left alone, each would hang a real job: the other ranks wait in DDP's all-reduce for a rank that
raised, that waits in a collective nobody else joins, or that never comes back.
"""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddp_demo.check import Recipe


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _recipe(trouble, at_step: int) -> Recipe:
    """A plain step that calls ``trouble()`` on rank 1 (rank 0 for a collective) at step ``at_step``."""
    torch.manual_seed(0)
    steps = []

    def step(model, batch, optimizer):
        steps.append(None)
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if len(steps) == at_step and dist.is_initialized():
            trouble()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    x = torch.randn(12, 4)
    return Recipe(nn.Linear(4, 1), (x, x.sum(dim=1, keepdim=True)), step=step, steps=3,
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def _raise_on_rank_1():
    if _rank() == 1:
        raise RuntimeError("the data loader of rank 1 ran out of samples")


def raises_on_one_rank():
    return _recipe(_raise_on_rank_1, at_step=2)


def _all_reduce_on_rank_0():
    if _rank() == 0:
        dist.all_reduce(torch.ones(3))  # e.g. a metric logged by rank 0 only


def collective_on_one_rank():
    return _recipe(_all_reduce_on_rank_0, at_step=2)


def _sleep_on_rank_1():
    if _rank() == 1:
        time.sleep(3600)  # a deadlock, a stuck file read


def never_returns():
    return _recipe(_sleep_on_rank_1, at_step=1)
