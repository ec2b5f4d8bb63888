"""Training steps with the bugs that make "DDP on N GPUs != 1 GPU", each named by the check; and
the same step written right.

    python -m ddp_demo.check examples/check/step_bugs.py:right              # PASS
    python -m ddp_demo.check examples/check/step_bugs.py:module_forward     # FAIL: forward through model.module
    python -m ddp_demo.check examples/check/step_bugs.py:undivided          # FAIL: loss not divided by K
    python -m ddp_demo.check examples/check/step_bugs.py:all_in_no_sync     # FAIL: last micro-batch in no_sync
    python -m ddp_demo.check examples/check/step_bugs.py:lr_scaled          # FAIL: learning rate x N
    python -m ddp_demo.check examples/check/step_bugs.py:rank_seeded_numpy  # FAIL: seeded by rank (_torch, _random too)
    python -m ddp_demo.check examples/check/step_bugs.py:same_seed          # PASS: the same draws on every rank
    python -m ddp_demo.check examples/check/step_bugs.py:clip_local         # FAIL: clipping local gradients
    python -m ddp_demo.check examples/check/step_bugs.py:decay_local        # FAIL: weight decay on local gradients

Each returns a ``ddp_demo.check.Recipe`` with its own ``step(model, batch, optimizer)``; with
``accumulate=2`` the batch it gets is a list of micro-batches (one process gets one: the whole batch).
"""

import contextlib
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddp_demo.check import Recipe

WEIGHT_DECAY, MAX_NORM = 0.1, 0.05  # MAX_NORM below the gradients' norm: the clipping bites


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _recipe(step, accumulate=2, lr=0.05, **kw) -> Recipe:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    optimizer = kw.pop("optimizer", lambda params: torch.optim.SGD(params, lr=lr))
    return Recipe(model, (x, y), step=step, accumulate=accumulate, optimizer=optimizer, steps=2, **kw)


def _finish(optimizer):
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def right_step(model, batch, optimizer, scale=1.0):
    for i, (x, y) in enumerate(batch):
        with contextlib.nullcontext() if i == len(batch) - 1 else model.no_sync():  # the last one averages
            (F.cross_entropy(model(x * scale), y) / len(batch)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)  # once, on the averaged gradients
    for p in model.parameters():
        p.grad.add_(p.detach(), alpha=WEIGHT_DECAY)  # L2 decay, once, after the averaging
    _finish(optimizer)


def right():
    return _recipe(right_step)


def module_forward():
    def step(model, batch, optimizer):
        for x, y in batch:
            (F.cross_entropy(model.module(x), y) / len(batch)).backward()  # bypasses DDP: nothing is averaged
        _finish(optimizer)

    return _recipe(step)


def undivided():
    def step(model, batch, optimizer):
        for i, (x, y) in enumerate(batch):
            with contextlib.nullcontext() if i == len(batch) - 1 else model.no_sync():
                F.cross_entropy(model(x), y).backward()  # K micro-batches' gradients add up: K times too large
        _finish(optimizer)

    return _recipe(step)


def all_in_no_sync():
    def step(model, batch, optimizer):
        with model.no_sync():  # every micro-batch, the last one too: the gradients are never averaged
            for x, y in batch:
                (F.cross_entropy(model(x), y) / len(batch)).backward()
        _finish(optimizer)

    return _recipe(step)


def lr_scaled():
    """The "linear scaling rule" applied while keeping the global batch: N times the step."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _recipe(right_step, optimizer=lambda params: torch.optim.SGD(params, lr=0.05 * world))


def _augmenting(draw):
    """A batch-level augmentation: every sample scaled by one random factor per step."""
    return lambda model, batch, optimizer: right_step(model, batch, optimizer, scale=0.5 + draw())


def rank_seeded_torch():
    recipe = _recipe(_augmenting(lambda: float(torch.rand(()))))
    torch.manual_seed(1234 + _rank())
    return recipe


def rank_seeded_numpy():
    np.random.seed(1234 + _rank())
    return _recipe(_augmenting(lambda: float(np.random.rand())))


def rank_seeded_random():
    random.seed(1234 + _rank())
    return _recipe(_augmenting(random.random))


def same_seed():
    """All three generators seeded alike on every rank: each rank draws what one process draws."""
    recipe = _recipe(_augmenting(lambda: (float(torch.rand(())) + np.random.rand() + random.random()) / 3))
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    return recipe


def clip_local():
    def step(model, batch, optimizer):
        for i, (x, y) in enumerate(batch):
            with contextlib.nullcontext() if i == len(batch) - 1 else model.no_sync():
                (F.cross_entropy(model(x), y) / len(batch)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)  # after each: the first on local sums
        _finish(optimizer)

    return _recipe(step)


def decay_local():
    def step(model, batch, optimizer):
        for i, (x, y) in enumerate(batch):
            with contextlib.nullcontext() if i == len(batch) - 1 else model.no_sync():
                (F.cross_entropy(model(x), y) / len(batch)).backward()
            for p in model.parameters():
                p.grad.add_(p.detach(), alpha=WEIGHT_DECAY)  # per micro-batch: K times, into local gradients
        _finish(optimizer)

    return _recipe(step)
