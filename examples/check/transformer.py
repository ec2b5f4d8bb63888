"""A target for ``python -m ddp_demo.check``: a small transformer classifier (passes).

    python -m ddp_demo.check examples/check/transformer.py:build

A target is a function with no arguments returning ``(model, batch, loss_fn)``: the same
weights on every call (seeded here), one global batch (inputs first, target last) and a loss
that is a mean over the batch.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, two encoder layers, mean pooling, a linear head."""

    def __init__(self, vocab: int = 50, length: int = 12, width: int = 32, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


def build():
    torch.manual_seed(0)
    model = TinyTransformer()
    tokens = torch.randint(0, 50, (24, 12))
    labels = torch.randint(0, 4, (24,))
    return model, (tokens, labels), F.cross_entropy
