"""Targets for ``python -m ddp_demo.check``: dropout in training mode fails; switched off, it passes.

    python -m ddp_demo.check examples/check/dropout.py:build       # FAIL: randomness
    python -m ddp_demo.check examples/check/dropout.py:build_eval  # PASS
"""

import torch
import torch.nn.functional as F
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    x = torch.randn(24, 6)
    y = torch.randint(0, 3, (24,))
    return model, (x, y), F.cross_entropy


def build_eval():
    """Dropout off (eval mode): what remains of the model is checked."""
    model, batch, loss_fn = build()
    return model.eval(), batch, loss_fn
