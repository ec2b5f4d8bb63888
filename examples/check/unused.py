"""Targets for ``python -m ddp_demo.check``: a parameter that gets no gradient fails; frozen, it passes.

    python -m ddp_demo.check examples/check/unused.py:build          # FAIL: unused parameters
    python -m ddp_demo.check examples/check/unused.py:build_frozen   # PASS
    python -m ddp_demo.check examples/check/unused.py:build_sometimes  # FAIL: unused on some ranks

Plain DDP would raise at the second step for ``build`` and hang for ``build_sometimes``
(rank 1 waits for a gradient rank 0 never sends); the check finds both first and names them.
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


class SometimesAux(TwoHeads):
    """Uses ``aux`` only when the batch's first sample has a positive first feature: the whole
    batch and rank 0's shard do, rank 1's shard (samples 1, 3, ...) does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.body(x))
        out = self.main(hidden)
        return out + self.aux(hidden).sum(dim=1, keepdim=True) if x[0, 0] > 0 else out


def build():
    torch.manual_seed(0)
    x = torch.randn(24, 6)
    return TwoHeads(), (x, torch.randint(0, 3, (24,))), F.cross_entropy


def build_frozen():
    model, batch, loss_fn = build()
    model.aux.requires_grad_(False)
    return model, batch, loss_fn


def build_sometimes():
    torch.manual_seed(0)
    x = torch.randn(24, 6)
    x[0::2, 0], x[1::2, 0] = 1.0, -1.0
    return SometimesAux(), (x, torch.randint(0, 3, (24,))), F.cross_entropy
