"""A target for ``python -m ddp_demo.check`` whose failure no detector names.

    python -m ddp_demo.check examples/check/batch_centred.py:build   # FAIL: cause not recognised

The model centres its inputs on the batch's mean by hand, so each sample's output depends on
the other samples in its batch, as with BatchNorm; no layer says so, and the check prints every
tensor's difference instead of a cause.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Centred(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x - x.mean(dim=0))


def build():
    torch.manual_seed(0)
    x = torch.randn(24, 4) + 1.0
    return Centred(), (x, torch.randint(0, 2, (24,))), F.cross_entropy
