"""Targets for ``python -m ddp_demo.check``: a loss that sums fails; the same loss averaged passes.

    python -m ddp_demo.check examples/check/summed_loss.py:build        # FAIL: summed loss
    python -m ddp_demo.check examples/check/summed_loss.py:build_mean   # PASS
"""

import torch
import torch.nn.functional as F
from torch import nn


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(24, 5)
    return model, (x, x.sum(dim=1, keepdim=True))


def summed(output, target):
    return F.mse_loss(output, target, reduction="sum")


def build():
    model, batch = _model_and_batch()
    return model, batch, summed


def build_mean():
    model, batch = _model_and_batch()
    return model, batch, F.mse_loss
