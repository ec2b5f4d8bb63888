"""Targets for ``python -m ddp_demo.check``: a parameter that gets no gradient fails; frozen, it passes.

    python -m ddp_demo.check examples/check/unused.py:build          # FAIL: unused parameters
    python -m ddp_demo.check examples/check/unused.py:build_frozen   # PASS
"""

import torch
import torch.nn.functional as F
from torch import nn


class TwoHeads(nn.Module):
    """Two heads, but forward only ever uses the first: ``aux`` never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.main = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(torch.relu(self.body(x)))


def build():
    torch.manual_seed(0)
    x = torch.randn(24, 6)
    return TwoHeads(), (x, torch.randint(0, 3, (24,))), F.cross_entropy


def build_frozen():
    model, batch, loss_fn = build()
    model.aux.requires_grad_(False)
    return model, batch, loss_fn
