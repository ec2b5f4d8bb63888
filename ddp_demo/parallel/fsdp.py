"""Fully sharded data parallelism written out by hand: what ``fully_shard`` (FSDP2) does, in Python.

    sharding = ScratchFSDP(module, blocks)           # FSDP2: fully_shard(b) for b in blocks; fully_shard(module)
    optimizer = torch.optim.Adam(module.parameters())  # the Module's parameters are now this rank's shards

The seed article's point is that a Module owns its parameters. DDP leaves that ownership whole on
every rank; here each rank keeps 1/N of every parameter and rebuilds a block's whole parameters
only while that block computes. One step, block by block (FSDP2's names in brackets, from
torch/distributed/fsdp/_fully_shard/):

1. construction: each parameter is cut along dimension 0 into N chunks (:func:`chunk_rows`); this
   rank keeps its chunk of every parameter of a block in one flat, padded tensor, the block's
   *shard*, and the Module's parameters become views of it, so an optimizer built on
   ``module.parameters()`` steps on shards only [FSDPParam._init_sharded_param];
2. before the block's forward: all-gather every rank's shard and copy each parameter out of it;
   the block computes with the whole tensors [FSDPParamGroup.pre_forward, unshard];
3. after the block's forward: free the whole tensors' storage and put the shards back. Autograd
   still holds the (now empty) tensor objects it saved for backward [post_forward, reshard];
4. backward reaches the block (a hook on its output): all-gather again into the same storage, so
   the tensors autograd saved are whole again [pre_backward, registered on the outputs];
5. once every parameter of the block has its gradient: reduce-scatter the whole gradients (a sum
   over ranks, each rank receiving its own chunk), divided by N, into the shards' ``.grad``; free
   the whole tensors [post_backward, foreach_reduce].

The chunking rule is FSDP2's (``torch.chunk`` on dim 0, _fsdp_param.py and _fsdp_common.py's
``_chunk_with_empty``), so a shard is row for row ``fully_shard``'s local tensor: a parameter
of ``d`` rows is cut into chunks of ``c = ceil(d / N)`` rows; rank r holds rows
``[min(r c, d), min((r + 1) c, d))``, so the last ranks may hold fewer rows or none, and every
chunk is stored padded (zeros) to ``c`` rows so that all ranks send equal-sized pieces. A 0-dim
parameter counts as one row: rank 0 holds it (fully_shard refuses those; a flat shard does not).

Left out: prefetching and overlap (CUDA streams), mixed precision, CPU offload, keeping the root
unsharded after forward (FSDP2 does, since its backward comes first), parameters shared between
blocks, loading a sharded state dict. Proven equal to ``fully_shard`` by tests/test_fsdp_scratch.py;
explained in docs/fsdp_from_scratch.md.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """FSDP2's rule (module docstring): ``(c, first row, rows held)`` of this rank's chunk."""
    c = math.ceil(rows / world_size)
    start = min(rank * c, rows)
    return c, start, min(start + c, rows) - start


def divide_factors(world_size: int, dtype: torch.dtype) -> tuple[float, float, dist.ReduceOp]:
    """How FSDP2 averages a gradient (_fsdp_collectives.py, ``_get_gradient_divide_factors``):
    float32 and bfloat16 let the collective average (``AVG``; ``SUM`` at N = 1); other dtypes
    (float64 here) divide by a power of two near sqrt(N) before the sum and by the rest after,
    against overflow. ``(before, after, op)``; the same arithmetic gives the same bits."""
    if dtype in (torch.float32, torch.bfloat16):
        return 1.0, 1.0, dist.ReduceOp.AVG if world_size > 1 else dist.ReduceOp.SUM
    before = 1
    while world_size % before == 0 and world_size / before > before:
        before *= 2
    return float(before), world_size / before, dist.ReduceOp.SUM


@dataclass
class FlatParam:
    """One parameter of a block, sharded [FSDP2: FSDPParam]."""

    name: str  # its name in the whole Module
    owner: nn.Module  # the Module whose attribute it is
    attr: str
    shape: torch.Size
    rows: int  # d: dimension 0 (1 for a 0-dim parameter)
    chunk: int  # c = ceil(d / N): rows per chunk, padding included
    start: int  # the first row this rank holds
    held: int  # rows this rank holds (c, fewer, or 0)
    offset: int  # where its chunk starts in the block's flat shard
    sharded: nn.Parameter | None = None  # this rank's rows: a view of the block's shard
    gathered: torch.Tensor | None = None  # N chunks, padded: the all-gather's copy of it
    full: nn.Parameter | None = None  # the whole parameter: a view of ``gathered``

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def chunk_numel(self) -> int:
        return self.chunk * self.row_numel


def free(t: torch.Tensor) -> None:
    """Release a tensor's memory but keep the object [_fsdp_param.py: free_storage]."""
    t.untyped_storage().resize_(0)


def alloc(t: torch.Tensor) -> None:
    """Give a freed tensor its memory back, contents undefined [alloc_storage]."""
    t.untyped_storage().resize_(t.numel() * t.element_size())


class ShardedBlock:
    """The parameters one ``fully_shard`` call manages, and its hooks [FSDPParamGroup]."""

    def __init__(self, name: str, module: nn.Module, params: list[tuple[str, nn.Module, str]], owner: ScratchFSDP):
        self.name, self.module, self.fsdp = name, module, owner
        n, rank = owner.world_size, owner.rank
        self.params, offset = [], 0
        for qualified, holder, attr in params:
            p = holder._parameters[attr]
            rows = p.shape[0] if p.dim() else 1
            fp = FlatParam(qualified, holder, attr, p.shape, rows, *chunk_rows(rows, n, rank), offset=offset)
            self.params.append(fp)
            offset += fp.chunk_numel
        whole = [holder._parameters[attr] for _, holder, attr in params]
        if len({w.dtype for w in whole}) != 1:
            raise ValueError(f"block {name!r}: give its parameters one dtype (one flat shard, one reduce-scatter)")
        self.shard = whole[0].detach().new_zeros(offset)  # the padding stays zero
        with torch.no_grad():
            for fp, w in zip(self.params, whole, strict=True):
                self._make_shard(fp, w)
        self.unsharded, self.ready, self.in_backward = False, 0, False
        module.register_forward_pre_hook(self._pre_forward)
        module.register_forward_hook(self._post_forward)

    def _make_shard(self, fp: FlatParam, whole: torch.Tensor) -> None:
        n, keep = self.fsdp.world_size, fp.held * fp.row_numel
        mine = self.shard[fp.offset : fp.offset + keep]
        mine.copy_(whole.reshape(fp.rows, -1)[fp.start : fp.start + fp.held].reshape(-1))
        fp.sharded = nn.Parameter(mine.view(fp.held, *fp.shape[1:]), requires_grad=whole.requires_grad)
        fp.gathered = whole.new_empty(n * fp.chunk_numel)
        fp.full = nn.Parameter(fp.gathered[: whole.numel()].view(fp.shape), requires_grad=whole.requires_grad)
        free(fp.gathered)  # the whole parameter exists only while the block computes
        fp.full.register_post_accumulate_grad_hook(self._grad_ready)
        fp.owner._parameters[fp.attr] = fp.sharded  # [FSDPParam._setattr_on_modules]

    # ---- all-gather and free -----------------------------------------------------------------

    @torch.no_grad()
    def unshard(self, why: str) -> None:
        """All-gather the shards; copy each parameter's N chunks into its whole tensor [unshard,
        foreach_all_gather and foreach_all_gather_copy_out]."""
        n = self.fsdp.world_size
        out = self.shard.new_empty(n * self.shard.numel())
        dist.all_gather_single(out, self.shard, group=self.fsdp.group)  # rank r's shard at row r
        out = out.view(n, -1)
        for fp in self.params:
            alloc(fp.gathered)
            # Autograd checks that saved tensors were not changed in place; this refill restores
            # what it saved, so the check is told to look away (FSDP2 does the same).
            with torch.autograd._unsafe_preserve_version_counter(fp.full):
                fp.gathered.view(n, -1).copy_(out[:, fp.offset : fp.offset + fp.chunk_numel])
        self.unsharded = True
        self.fsdp.log(f"all-gather ({why})", self, out.numel() * out.element_size())

    def reshard(self, why: str) -> None:
        """Free the whole parameters; the Module holds its shards again [reshard, to_sharded]."""
        for fp in self.params:
            fp.owner._parameters[fp.attr] = fp.sharded
            free(fp.gathered)
        self.unsharded, self.in_backward = False, False
        self.fsdp.log(f"free ({why})", self, 0)

    # ---- hooks -------------------------------------------------------------------------------

    def _pre_forward(self, module: nn.Module, args) -> None:
        self.unshard("forward")
        for fp in self.params:
            fp.owner._parameters[fp.attr] = fp.full  # [FSDPParam.to_unsharded]

    def _post_forward(self, module: nn.Module, args, output):
        if self.fsdp.reshard_after_forward:
            self.reshard("after forward")
        else:
            self.fsdp.log("keep whole (after forward)", self, 0)
        if torch.is_grad_enabled():  # [FSDPState._register_pre_backward_hook]
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(self._pre_backward)
        return output

    def _pre_backward(self, grad: torch.Tensor) -> None:
        """The gradient of the block's output exists: the block's backward is next."""
        self.fsdp.queue_final_callback()
        if self.in_backward:
            return  # another output of the block: already done
        self.in_backward = True
        if self.unsharded:
            self.fsdp.log("backward (still whole)", self, 0)
        elif self.fsdp.gather_in_backward:
            self.unshard("backward")

    def _grad_ready(self, _: nn.Parameter) -> None:
        """Autograd has accumulated one whole gradient; after the block's last, reduce-scatter."""
        self.ready += 1
        if self.ready < len(self.params):
            return
        self.ready = 0
        if self.fsdp.syncing:
            self.reduce_scatter()
        self.reshard("after backward")  # unreduced gradients (no sync) stay on the whole parameters

    @torch.no_grad()
    def reduce_scatter(self) -> None:
        """Each rank's whole gradients in, the average of its own chunk out [foreach_reduce]."""
        n, rank = self.fsdp.world_size, self.fsdp.rank
        grads = self.shard.new_zeros(n, self.shard.numel())  # row r: every parameter's chunk r, padded
        for fp in self.params:  # [foreach_reduce_scatter_copy_in: chunk_cat]
            padded = grads.new_zeros(n * fp.chunk_numel)
            padded[: fp.full.numel()] = fp.full.grad.reshape(-1)
            grads[:, fp.offset : fp.offset + fp.chunk_numel] = padded.view(n, -1)
            fp.full.grad = None  # the whole gradient is freed once copied in
        before, after, op = divide_factors(n, grads.dtype)
        out = grads.new_empty(self.shard.numel())
        if not self.fsdp.reduce:  # the negative control: this rank's own chunk, nothing averaged
            out.copy_(grads[rank])
        else:
            grads.div_(before)  # no-ops when 1, as FSDP2's _div_if_needed
            dist.reduce_scatter_single(out, grads.view(-1), op=op, group=self.fsdp.group)
            out.div_(after)
        self.fsdp.log("reduce-scatter", self, grads.numel() * grads.element_size())
        for fp in self.params:  # views of ``out``, accumulated if a gradient is already there
            g = out[fp.offset : fp.offset + fp.held * fp.row_numel].view(fp.sharded.shape)
            if fp.sharded.grad is None:
                fp.sharded.grad = g
            else:
                fp.sharded.grad += g

    def full_bytes(self) -> int:
        """Bytes of whole parameters this block holds now, read from their storage."""
        return sum(fp.gathered.untyped_storage().nbytes() for fp in self.params)


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, list | tuple):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


@dataclass(frozen=True)
class Event:
    """One thing a block did: what, which block, bytes moved, and the bytes of whole parameters
    each block held right after it (``{block: bytes}``): the memory record."""

    what: str
    block: str
    nbytes: int
    held: dict


# The record of all-gathers, frees and reduce-scatters is for explain and the memory test, which read a few
# steps; a long training run keeps only the latest, so the record costs no memory that grows with the steps.
EVENTS_KEPT = 4096


class ScratchFSDP:
    """Shards ``module`` in place: each of ``blocks`` (sub-Modules), then the rest under the root.

    ``reduce=False`` and ``gather_in_backward=False`` are the negative controls: no
    reduce-scatter (each rank keeps its own chunk of its own gradient) and no all-gather before a
    block's backward (autograd then finds the whole parameters it saved freed).
    ``reshard_after_forward=False`` keeps each block whole from its forward to its backward
    (FSDP2's option of that name: one all-gather fewer, more memory)."""

    def __init__(self, module: nn.Module, blocks: list[nn.Module] = (), group=None, reduce: bool = True,
                 gather_in_backward: bool = True, reshard_after_forward: bool = True):
        self.module, self.group = module, group or dist.group.WORLD
        self.reshard_after_forward = reshard_after_forward  # False: keep whole until backward (FSDP2's option)
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.reduce, self.gather_in_backward, self.syncing = reduce, gather_in_backward, True
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)  # explain and the tests read a step or a few
        self._callback_queued = False
        names = {id(m): name for name, m in module.named_modules()}
        taken: set[tuple[int, str]] = set()  # (owner, attribute): managed by an inner block
        self.blocks: list[ShardedBlock] = []
        for block in [*blocks, module]:  # inner blocks first, as fully_shard is called [fully_shard]
            params = [(f"{names[id(m)]}.{a}".lstrip("."), m, a) for m in block.modules()
                      for a, p in m._parameters.items() if p is not None and (id(m), a) not in taken]
            taken |= {(id(m), a) for _, m, a in params}
            if params:
                self.blocks.append(ShardedBlock(names[id(block)] or "(root)", block, params, self))

    def set_requires_gradient_sync(self, on: bool) -> None:
        """Off: backward leaves each rank's own whole gradients in place, to be accumulated; the
        next synced backward reduce-scatters their sum (FSDP2's method of the same name)."""
        self.syncing = on

    def queue_final_callback(self) -> None:
        """Once per backward, the root's end-of-backward check [_root_post_backward_final_callback]."""
        if not self._callback_queued:
            self._callback_queued = True
            Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self._callback_queued = False
        for block in self.blocks:
            if block.ready:
                raise RuntimeError(f"block {block.name!r}: only {block.ready} of its {len(block.params)} parameters "
                                   "got a gradient; ScratchFSDP needs every parameter of a block to get one")
            if block.unsharded:
                block.reshard("after backward")

    def log(self, what: str, block: ShardedBlock, nbytes: int) -> None:
        self.events.append(Event(what, block.name, nbytes, {b.name: b.full_bytes() for b in self.blocks}))

    def shard_bytes(self) -> dict[str, int]:
        """Bytes of each block's flat shard on this rank, padding included."""
        return {b.name: b.shard.numel() * b.shard.element_size() for b in self.blocks}

    @contextlib.contextmanager
    def summoned(self) -> Iterator[None]:
        """Whole parameters on the Module for the duration (every rank must enter)
        [FSDPModule.unshard, or the full state dict]."""
        for block in self.blocks:
            block.unshard("state dict")
            for fp in block.params:
                fp.owner._parameters[fp.attr] = fp.full
        try:
            yield
        finally:
            for block in self.blocks:
                block.reshard("state dict")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The Module's whole ``state_dict`` (every rank must call it; every rank gets it)."""
        with self.summoned(), torch.no_grad():
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
