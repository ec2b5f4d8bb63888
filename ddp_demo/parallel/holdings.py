"""What one rank holds under a strategy: which piece of each tensor, and how many bytes.

After a step a rank holds, per parameter, its value, its gradient and its optimizer state,
each whole (ddp), whole but with the optimizer state of its own share of the parameters only
(zero), or as one slice along dimension 0 (fsdp). :func:`pieces` lists them with the row at
which each starts in the whole tensor, so a proof can hold every slice against the same rows
of one process's tensor; :func:`held_bytes` counts the storage behind them.

FSDP2's slicing rule (``torch.chunk`` on dim 0, FSDP2 docs, ``fully_shard``): rank r holds
rows ``[r * c, min((r + 1) * c, d))`` with ``c = ceil(d / N)``, so the last ranks may hold fewer
rows or none. Its parameter storage is padded to ``c`` rows on every rank; its gradients live
in one flat buffer per block, each parameter's part padded the same way; the optimizer's state
is allocated for the unpadded slice.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard

from ddp_demo.core.dist import DistContext, all_ranks_equal
from ddp_demo.parallel.strategy import Wrapped


class Piece(NamedTuple):
    """A rank's part of a whole tensor: rows ``start .. start + len(tensor)`` of dimension 0."""

    start: int
    tensor: torch.Tensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def first_row(t: torch.Tensor, rank: int) -> int:
    """Where this rank's slice of ``t`` starts along dimension 0 (module docstring)."""
    if not isinstance(t, DTensor):
        return 0
    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on dimension 0, got placements {t.placements}")
    rows, n = t.shape[0], t.device_mesh.size()
    return min(rank * math.ceil(rows / n), rows)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The state this rank keeps: under ZeRO, its local optimizer's (its share only)."""
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    return inner.state


def pieces(wrapped: Wrapped, ctx: DistContext) -> dict[str, Piece]:
    """``param/NAME``, ``grad/NAME`` and ``state/NAME/KEY`` (e.g. ``exp_avg``, ``step``) -> this
    rank's piece, detached and cloned. A gradient that is None, or optimizer state another rank
    keeps, is absent."""
    module, out = wrapped.module, {}
    names = {id(p): name for name, p in module.named_parameters()}

    def piece(t: torch.Tensor) -> Piece:
        return Piece(first_row(t, ctx.rank), local(t).detach().clone())

    for name, p in module.named_parameters():
        out[f"param/{name}"] = piece(p)
        if p.grad is not None:
            out[f"grad/{name}"] = piece(p.grad)
    for p, state in optimizer_state(wrapped.optimizer).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state/{names[id(p)]}/{key}"] = piece(value)
    return out


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views into one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def held_bytes(wrapped: Wrapped) -> dict[str, int]:
    """Bytes this rank stores for parameters, gradients and optimizer state, counted from the
    tensors themselves (their storage, padding included). DDP's own gradient buckets (a second
    copy of the gradients unless ``gradient_as_bucket_view``) are not counted: they are DDP's,
    not the Module's; peak RSS shows them."""
    params = list(wrapped.module.parameters())
    state = [v for s in optimizer_state(wrapped.optimizer).values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    return {"parameters": _storage_bytes(params),
            "gradients": _storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer state": _storage_bytes(state)}


def buffers_differing(module: nn.Module, ctx: DistContext) -> list[str]:
    """Names of the buffers (BatchNorm's running statistics, ...) whose values are not the same
    on every rank. DDP broadcasts rank 0's buffers before each forward; FSDP2 never does
    (pytorch/torchtitan#670), so under fsdp a plain BatchNorm's statistics drift apart per rank
    and a full state dict silently returns rank 0's. Every rank must call it."""
    return [name for name, b in module.named_buffers() if not all_ranks_equal(b.detach(), ctx)]
