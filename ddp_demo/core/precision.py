"""Mixed precision: ``--precision fp32 | bf16 | fp16``.

``bf16`` and ``fp16`` run the forward pass and the loss under ``torch.autocast``: matrix
multiplies and convolutions take 16-bit inputs, while the parameters, their gradients,
DDP's all-reduce and the optimizer stay in float32 (AMP docs, "Automatic Mixed
Precision"). Backward runs outside autocast, as the docs ask; autograd gives each op's
backward the dtypes its forward used.

bf16 keeps float32's exponent range, so its gradients need no scaling. fp16's range ends
at 65504 and small gradients underflow to zero, so fp16 takes a ``GradScaler``; torch's
CPU autocast is bf16-first and this project supports fp16 on CUDA only (``TrainConfig``
refuses it on the CPU with one line).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How the loop runs forward, scales the loss and applies the step at one precision."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        if self.name not in AUTOCAST_DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.name])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16: multiply the loss so small gradients stay representable (GradScaler)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16: unscale, skip the step if a gradient overflowed, adapt the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
