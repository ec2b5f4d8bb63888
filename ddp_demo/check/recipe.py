"""The whole training step a target may describe: :class:`Recipe`, and how the check runs it.

A target returns either ``(model, batch, loss_fn)`` (trained by the check's own step: ``--optimizer``,
``--lr``, ``--steps``) or a :class:`Recipe`: the same three things plus the optimizer, schedule,
clipping, accumulation, autocast and, if you have one, your own ``step(model, batch, optimizer)``.

The check runs the recipe twice and compares (docs/check.md): on N processes, each on its share of
the batch, with ``model`` the wrapped model (``DistributedDataParallel`` under ddp and zero; under
fsdp a stand-in with DDP's ``no_sync()`` over the ``fully_shard``-ed module); and in one process on
the whole batch, with ``model`` a stand-in whose ``no_sync()`` does nothing. With ``accumulate = K``
each rank's share is cut into K micro-batches and ``step`` gets them as a list, while one process
gets a list of one, the whole batch: accumulation exists to make a big batch out of small ones, so
it must equal one step on the big batch. After every call of ``step`` the check steps the scheduler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


@dataclass
class Recipe:
    """What a target may return instead of ``(model, batch, loss_fn)``; only ``model`` and ``batch`` are required."""

    model: nn.Module
    """A fresh Module, the same weights on every call (seed inside the target)."""
    batch: Batch
    """One global batch: tensors whose first dimension is the batch, inputs first, target last."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """``loss_fn(output, target)``, a mean over the samples; required unless ``step`` is given."""
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    """``params -> Optimizer`` (param groups welcome); default: ``--optimizer`` at ``--lr``."""
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    """``optimizer -> LR scheduler``; the check calls its ``step()`` after every training step."""
    clip_grad_norm: float | None = None
    """The check's step clips the averaged gradients' norm to this (``clip_grad_norm_``)."""
    accumulate: int = 1
    """Micro-batches per step on each rank: the first K - 1 in ``no_sync()``, each loss divided by K."""
    autocast: torch.dtype | None = None
    """``torch.bfloat16``: forward under CPU autocast, checked in float32 against the bf16 bound."""
    steps: int | None = None
    """Training steps; default ``--steps``."""
    step: Callable[[nn.Module, Any, torch.optim.Optimizer], Any] | None = None
    """Your own ``step(model, batch, optimizer)``: forward, backward, clipping, ``optimizer.step()``,
    ``zero_grad()``, as in your training script. ``batch`` is a tuple, or with ``accumulate > 1`` a list
    of micro-batches (tuples). It may return the loss."""


def refuse(recipe: Recipe) -> str | None:
    """What is wrong with a recipe's settings, in words (None: nothing)."""
    for name in ("loss_fn", "optimizer", "scheduler", "step"):
        if getattr(recipe, name) is not None and not callable(getattr(recipe, name)):
            return f"Recipe.{name} must be callable (it is a {type(getattr(recipe, name)).__name__})"
    if recipe.step is None and recipe.loss_fn is None:
        return "a Recipe needs loss_fn, or its own step(model, batch, optimizer)"
    if not isinstance(recipe.accumulate, int) or recipe.accumulate < 1:
        return f"Recipe.accumulate must be a positive integer (got {recipe.accumulate!r})"
    if recipe.steps is not None and (not isinstance(recipe.steps, int) or recipe.steps < 1):
        return f"Recipe.steps must be a positive integer (got {recipe.steps!r})"
    if recipe.clip_grad_norm is not None and not recipe.clip_grad_norm > 0:
        return f"Recipe.clip_grad_norm must be a positive number (got {recipe.clip_grad_norm!r})"
    if recipe.autocast not in (None, torch.bfloat16):
        return f"Recipe.autocast {recipe.autocast} has no stated bound; use torch.bfloat16 or None"
    return None


class OneProcess(nn.Module):
    """The model ``step`` gets in one process: DDP's interface (``module``, ``no_sync``) over the bare Module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class Sharded(OneProcess):
    """The model ``step`` gets under fsdp: ``no_sync()`` turns FSDP2's gradient reduction off
    (``set_requires_gradient_sync``, through ``Wrapped.set_grad_sync``). ``module`` is the sharded
    Module itself: FSDP's hooks live on it, so calling it directly bypasses nothing."""

    def __init__(self, module: nn.Module, set_grad_sync: Callable[[bool], None]):
        super().__init__(module)
        self.set_grad_sync = set_grad_sync
        self.syncing = True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.set_grad_sync(False)
        self.syncing = False
        try:
            yield
        finally:
            self.set_grad_sync(True)
            self.syncing = True


def micro_batches(batch: Batch, k: int) -> list[Batch]:
    """K equal consecutive pieces of this process's batch."""
    size = batch[0].shape[0] // k
    return [tuple(t[i * size:(i + 1) * size] for t in batch) for i in range(k)]


def check_step(recipe: Recipe) -> Callable[[nn.Module, Any, torch.optim.Optimizer], float]:
    """The check's own step for a recipe without one: what ddp_demo's trainer does (core/accumulate.py)."""
    autocast = recipe.autocast

    def step(model: nn.Module, batch: Batch | list[Batch], optimizer: torch.optim.Optimizer) -> float:
        pieces = batch if isinstance(batch, list) else [batch]
        total = 0.0
        for i, (*inputs, target) in enumerate(pieces):
            # Only the last micro-batch's backward averages; no_sync is entered before forward,
            # where DDP decides whether the coming backward all-reduces (DDP docs, no_sync).
            sync = contextlib.nullcontext() if i == len(pieces) - 1 else model.no_sync()
            with sync:
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    loss = recipe.loss_fn(model(*inputs), target)
                (loss / len(pieces)).backward()  # the mean over the rank's K micro-batches
            total += float(loss.detach()) / len(pieces)
        if recipe.clip_grad_norm is not None:  # after the last backward: the gradients are averaged
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step
