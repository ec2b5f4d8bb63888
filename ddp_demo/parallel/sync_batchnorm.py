"""BatchNorm whose statistics cover the global batch, on the CPU and gloo too.

Under DDP each rank's plain BatchNorm normalises with its own shard's mean and variance, so
N processes do not train the model one process trains. ``torch.nn.SyncBatchNorm`` fixes that
on GPUs but refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"), so a
model with BatchNorm cannot be checked in CPU CI. :func:`convert_sync_batchnorm` swaps every
BatchNorm layer for :class:`SyncBatchNorm`: torch's own on CUDA, and on the CPU two
all-reduces per layer and step:

- forward: the per-channel sum, sum of squares and count over every rank, from which the
  global mean and (biased) variance follow; the running statistics use the unbiased variance
  over the global count, as ``F.batch_norm`` does for one process;
- backward: the per-channel sums of ``dy`` and ``dy * x_hat``, the two batch terms of the input
  gradient. The weight and bias gradients stay local sums: DDP averages them as it does every
  other parameter's (torch's SyncBatchNorm does the same, ``torch/nn/modules/_functions.py``).

Counts may differ between ranks (a rank may even hold no samples): every sum is over samples,
so the global statistics weigh each sample once. The sums are accumulated in float64; the
one-pass variance ``E[x^2] - E[x]^2`` loses about ``1e-16 * mean^2 / var`` of its value, which
is negligible unless a channel's mean is many orders of magnitude above its spread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _channel_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channels (dim 1): batch, then length / height / width."""
    return [0, *range(2, x.dim())]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``x`` (C -> 1, C, 1, ...)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def global_stats(x: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count per channel over every rank's ``x`` (float64)."""
    acc, dims = x.detach().to(torch.float64), _channel_dims(x)
    count = acc.new_tensor([x.numel() // x.size(1) if x.size(1) else 0])
    sums = torch.cat([acc.sum(dims), (acc * acc).sum(dims), count])
    dist.all_reduce(sums, group=group)
    total, sq, n = sums.split([x.size(1), x.size(1), 1])
    if n.item() <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(n.item())} over all ranks")
    mean = total / n
    return mean, (sq / n - mean * mean).clamp_min(0.0), n


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = x_hat * weight + bias`` with ``x_hat = (x - mean) * invstd`` over the global batch.

    The statistics come in as constants; backward adds their part of the input gradient,
    ``invstd * weight * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with both means global.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        x_hat = (x - _per_channel(mean, x).to(x.dtype)) * _per_channel(invstd, x).to(x.dtype)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.group = group
        y = x_hat if weight is None else x_hat * _per_channel(weight, x)
        return y if bias is None else y + _per_channel(bias, x)

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, invstd, count = ctx.saved_tensors
        dims, channels = _channel_dims(dy), dy.size(1)
        local = torch.cat([dy.to(torch.float64).sum(dims), (dy.to(torch.float64) * x_hat).sum(dims)])
        grad_w = local[channels:].to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = local[:channels].to(dy.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = local.clone()
            dist.all_reduce(both, group=ctx.group)  # every rank's samples move the shared mean and variance
            mean_dy, mean_dy_xhat = (both / count).split(channels)
            scale = invstd if weight is None else invstd * weight.to(torch.float64)
            grad_x = (dy - _per_channel(mean_dy, dy).to(dy.dtype) - x_hat * _per_channel(mean_dy_xhat, dy).to(dy.dtype))
            grad_x = grad_x * _per_channel(scale, dy).to(dy.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm``'s contract, on the CPU too: there, ddp_demo's all-reduces
    (module docstring); on other devices, torch's SyncBatchNorm forward, unchanged.

    Not a subclass of ``nn.SyncBatchNorm``: DDP refuses to wrap a CPU module holding one
    ("SyncBatchNorm layers only work with GPU modules", ``DistributedDataParallel``).
    Outside a process group and in eval mode it is plain BatchNorm, as torch's is.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, *, bias: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias)
        self.process_group = process_group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self.training or not dist.is_initialized():
            return nn.SyncBatchNorm.forward(self, x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        group = self.process_group or dist.group.WORLD
        mean, var, count = global_stats(x, group)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        invstd = torch.rsqrt(var + self.eps)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, mean, invstd, count, group)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """What ``F.batch_norm`` does in training mode, with the global count (unbiased variance)."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` with :class:`SyncBatchNorm`, keeping its
    parameters, running statistics and mode (the same contract as torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm``). Call it before wrapping in DDP."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=module.bias is not None)
        out.weight, out.bias = module.weight, module.bias  # the same Parameter objects: optimizers keep them
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
