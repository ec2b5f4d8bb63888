"""The article's modules, a classifier built around its CNN, and the optimizer that trains them.

This file imports nothing from PyTorch's distributed package: a Module owns its parameters
and describes the math; it does not know how many processes train it. Data
parallelism wraps it from outside (see ``ddp_demo/train.py``, ``ddp_wrap``).
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU -> Linear, exactly as in the article."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(x)))


class SimpleCNN(nn.Module):
    """A 3x3 convolution (padding 1, so H and W are kept) followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class MultiplyByTwo(nn.Module):
    """One trainable scalar, initialised to 2.0: ``y = multiplier * x``."""

    def __init__(self):
        super().__init__()
        self.multiplier = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.multiplier


class CNNClassifier(nn.Module):
    """The article's SimpleCNN, unchanged, composed with a pooling + linear head.

    Max-pooling to an 8x8 grid keeps coarse positions, so the head can tell a
    horizontal bar from a vertical one; the features come from SimpleCNN alone.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 16):
        super().__init__()
        self.features = SimpleCNN(in_channels, channels)
        self.pool = nn.AdaptiveMaxPool2d(8)
        self.head = nn.Linear(channels * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


MODEL_NAMES = ("mlp", "cnn", "multiply")


def build_model(name: str, x_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    """Build the model for ``--model name`` sized to one sample of shape ``x_shape``.

    ``num_classes`` is ignored by the regression model.
    """
    if name == "mlp":
        return MLP(x_shape[0], hidden, num_classes)
    if name == "cnn":
        return CNNClassifier(x_shape[0], num_classes)
    if name == "multiply":
        return MultiplyByTwo()
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def make_optimizer(name: str, lr: float, params) -> torch.optim.Optimizer:
    """``--optimizer``: ``sgd`` (momentum 0.9) or ``adam``, at learning rate ``lr``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)
