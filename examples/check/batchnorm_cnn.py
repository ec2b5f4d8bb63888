"""Targets for ``python -m ddp_demo.check``: a CNN with BatchNorm fails; converted, it passes.

    python -m ddp_demo.check examples/check/batchnorm_cnn.py:build          # FAIL: BatchNorm
    python -m ddp_demo.check examples/check/batchnorm_cnn.py:build_synced   # PASS

Under DDP each rank's BatchNorm normalises with its own shard's statistics;
``ddp_demo.convert_sync_batchnorm`` makes every layer use the global batch's.
"""

import torch
import torch.nn.functional as F
from torch import nn

import ddp_demo


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    )
    images = torch.randn(24, 1, 8, 8)
    labels = torch.randint(0, 3, (24,))
    return model, (images, labels), F.cross_entropy


def build_synced():
    model, batch, loss_fn = build()
    return ddp_demo.convert_sync_batchnorm(model), batch, loss_fn
