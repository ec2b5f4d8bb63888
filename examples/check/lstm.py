"""A target for ``python -m ddp_demo.check``: a two-layer LSTM regressor (passes).

    python -m ddp_demo.check examples/check/lstm.py:build
"""

import torch
import torch.nn.functional as F
from torch import nn


class SequenceRegressor(nn.Module):
    """A two-layer LSTM over the sequence; a linear layer reads its last hidden state."""

    def __init__(self, features: int = 8, hidden: int = 24):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


def build():
    torch.manual_seed(0)
    model = SequenceRegressor()
    x = torch.randn(24, 10, 8)
    y = x.sum(dim=(1, 2)) / 10
    return model, (x, y), F.mse_loss
