"""Gradient accumulation: one optimizer step's gradient from K micro-batches.

Each rank splits its ``B / N`` samples into ``K`` equal micro-batches and runs forward
and backward on one at a time, so only one micro-batch's activations are alive at
once. ``.grad`` adds up across backward calls, so scaling each micro-batch's mean loss
by ``1/K`` leaves the mean over the rank's whole batch in ``.grad``; DDP then averages
over ranks, which gives the mean over the global batch: the gradient one process
computes on all ``B`` samples at once.

Only the last micro-batch needs DDP's all-reduce. The first ``K - 1`` run under
``DDP.no_sync()``, which must be entered *before* forward: DDP decides during forward
whether the coming backward will all-reduce (DDP docs, ``no_sync``; nanoGPT sets
``require_backward_grad_sync`` before forward for the same reason). How that is done is
what differs between launchers, so it is a :class:`GradSync` the caller passes in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from ddp_demo.core.precision import Precision

FP32 = Precision("fp32", torch.device("cpu"))  # no autocast, no scaling: the default


@dataclass(frozen=True)
class GradSync:
    """How one micro-batch's forward and backward are run."""

    context: Callable[[bool], AbstractContextManager]  # (is it the last micro-batch?) -> entered before forward
    backward: Callable[[torch.Tensor], None]  # takes the micro-batch's mean loss; scales it by 1/K itself


def ddp_grad_sync(model: torch.nn.Module, k: int, never_sync: bool = False) -> GradSync:
    """The torchrun path: ``no_sync`` on the first K-1 micro-batches, each loss scaled by 1/K.

    ``never_sync`` is the negative control (``--skip-grad-sync``): no micro-batch syncs.
    A bare module (plain ``python``, no process group) has nothing to sync.
    """

    def context(is_last: bool) -> AbstractContextManager:
        if hasattr(model, "no_sync") and (never_sync or not is_last):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(loss: torch.Tensor) -> None:
        (loss / k).backward()  # DDP all-reduces gradient buckets while this runs, unless in no_sync

    return GradSync(context, backward)


def accumulate_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
                         k: int, sync: GradSync, precision: Precision = FP32,
                         note_loss: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Forward and backward over ``k`` equal micro-batches of ``(x, y)``; ``.grad`` then holds
    the step's gradient. Returns the mean loss over this rank's samples (detached).

    Forward and loss run under ``precision``'s autocast, backward outside it. ``note_loss``
    sees each micro-batch's loss before its backward (core.agree carries it in the last one's).
    """
    losses = []
    # TrainConfig.check_batch_split made the rank's batch divide by k: the pieces are equal.
    for i, (xm, ym) in enumerate(zip(x.tensor_split(k), y.tensor_split(k), strict=True), start=1):
        with sync.context(i == k):
            with precision.autocast():
                loss = loss_fn(model(xm), ym)
            losses.append(loss.detach())
            if note_loss is not None:
                note_loss(loss)
            sync.backward(precision.scale(loss))
    return torch.stack(losses).mean()
