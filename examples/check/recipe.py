"""Targets that return a whole training recipe (``ddp_demo.check.Recipe``); all of them pass.

    python -m ddp_demo.check examples/check/recipe.py:build --strategy all          # PASS, bf16 bound
    python -m ddp_demo.check examples/check/recipe.py:build_float64 --strategy all  # PASS, float64
    python -m ddp_demo.check examples/check/recipe.py:build_own_step                # PASS

The recipe people train with: AdamW with weight decay (none on biases and norms), a cosine
schedule after a linear warm-up, ``clip_grad_norm_``, two micro-batches per step with
``no_sync`` on the first, and bf16 autocast. ``build_own_step`` does the same in a
``step(model, batch, optimizer)`` written as a training script would.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddp_demo.check import Recipe

STEPS, WARMUP = 6, 2


class Classifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def adamw(params):
    """Weight decay on matrices only: biases and LayerNorm's gains stay undecayed (param groups)."""
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=3e-3)


def cosine_with_warmup(optimizer):
    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build(autocast=torch.bfloat16):
    torch.manual_seed(0)
    x = torch.randn(48, 16)
    y = torch.randint(0, 5, (48,))
    return Recipe(Classifier(), (x, y), F.cross_entropy, optimizer=adamw, scheduler=cosine_with_warmup,
                  clip_grad_norm=1.0, accumulate=2, autocast=autocast, steps=STEPS)


def build_float64():
    """The same recipe without autocast, checked in float64."""
    return build(autocast=None)


def own_step(model, batch, optimizer):
    """A training script's step: ``batch`` is the list of this process's micro-batches."""
    for i, (x, y) in enumerate(batch):
        last = i == len(batch) - 1
        with contextlib.nullcontext() if last else model.no_sync():  # only the last backward averages
            loss = F.cross_entropy(model(x), y) / len(batch)
            loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # after the averaging backward
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def build_own_step():
    recipe = build(autocast=None)
    recipe.loss_fn, recipe.clip_grad_norm, recipe.step = None, None, own_step  # the step clips itself
    return recipe


def no_sync_step(model, batch, optimizer):
    with model.no_sync():  # the control: every micro-batch, the last too, so nothing is averaged
        for x, y in batch:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y) / len(batch)
            loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_control():
    """The bf16 recipe with its gradients never averaged: it must miss the bf16 bound by far."""
    recipe = build()
    recipe.loss_fn, recipe.clip_grad_norm, recipe.step = None, None, no_sync_step
    return recipe
