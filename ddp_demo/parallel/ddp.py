"""DistributedDataParallel written out by hand: torch's C++ Reducer, in Python you can read.

    model = ScratchDDP(module)       # where the trainer would write DDP(module)

torch's DDP hands the gradient work to a C++ ``Reducer`` (torch/csrc/distributed/c10d/
reducer.cpp); this class does that work with autograd hooks, tensor ops and ``torch.distributed``
calls, and each comment names the Reducer (or DDP) function the line stands for. One step:

1. construction: rank 0's parameters and buffers go to every rank; one hook per parameter
   fires as soon as backward has written its ``.grad``;
2. forward: decide whether the coming backward all-reduces (not inside ``no_sync()``);
3. backward: each ready gradient is copied, times 1/N, into its bucket's flat buffer; a full
   bucket's all-reduce (a sum) starts at once, asynchronously and in bucket order, while
   autograd computes the earlier layers' gradients: communication overlaps compute;
4. end of backward: wait for every bucket, copy the averages back into ``.grad``;
5. after the first synced backward, rebuild the buckets in the order gradients arrived.

It is a ``Joinable``: ``with Join([model]):`` lets ranks run out of batches at different steps,
and ``register_comm_hook`` takes DDP's communication hooks (not together with Join).
Left out: unused parameters, ``gradient_as_bucket_view``, ``static_graph``, mixed precision,
sparse gradients, CUDA streams. Proven equal to torch's DDP by
tests/test_scratch_ddp.py; explained in docs/ddp_from_scratch.md.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

MIB = 1024 * 1024  # DDP's bucket_cap_mb counts MiB (distributed.py, _MB_TO_BYTES)


def bucket_layout(nbytes: list[int], order: list[int], caps: list[float]) -> list[list[int]]:
    """Parameter indices, taken in ``order``, cut into buckets: a bucket closes once it holds at
    least its cap in bytes; bucket i has cap ``caps[i]``, the last cap repeats
    (Reducer's ``compute_bucket_assignment_by_size``)."""
    buckets, current, size = [], [], 0
    for i in order:
        current.append(i)
        size += nbytes[i]
        if size >= caps[min(len(buckets), len(caps) - 1)]:
            buckets.append(current)
            current, size = [], 0
    return buckets + [current] if current else buckets


class ScratchDDP(nn.Module, Joinable):
    """``DistributedDataParallel(module)``, by hand: gradients averaged over ranks during backward.

    ``bucket_cap_mb`` and ``first_bucket_cap_mb`` are DDP's defaults: the first bucket, whose
    gradients are ready first, is kept small so its all-reduce can start early.
    """

    def __init__(self, module: nn.Module, process_group=None, bucket_cap_mb: float = 25.0,
                 first_bucket_cap_mb: float = 1.0):
        super().__init__()
        Joinable.__init__(self)  # join support stays off until a Join context turns it on
        self.module, self.group = module, process_group or dist.group.WORLD
        self.process_group = self.group  # DDP's name for it
        self._comm_hook = None  # (state, hook) once register_comm_hook is called
        self.world_size = dist.get_world_size(self.group)
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        if len({p.dtype for p in self.params}) != 1:
            raise ValueError("ScratchDDP keeps one bucket dtype; give every parameter the same dtype")
        self.synced_buffers = list(module.buffers())
        self.device = self.params[0].device
        self.caps = [first_bucket_cap_mb * MIB, bucket_cap_mb * MIB]
        self.require_backward_grad_sync = True  # no_sync() turns it off (DDP's attribute of that name)
        self.divide_by_initial_world_size = True  # a Join option (join_hook)
        self.events: list[tuple[str, int, float]] = []  # the last step's timeline: (what, index, perf_counter)
        self._broadcast(self.params + self.synced_buffers, src=0)  # DDP's _sync_module_states
        # Before the first backward nobody knows the order gradients arrive in, so one bucket
        # holds every parameter (as DDP does when find_unused_parameters is False).
        self._set_buckets([list(range(len(self.params)))])
        self.rebuilt, self._syncing, self._ready_order, self._finished = False, False, [], True
        # Reducer::Reducer: a post-hook on each parameter's gradient accumulator.
        self.hook_handles = [p.register_post_accumulate_grad_hook(lambda _, i=i: self._grad_ready(i))
                             for i, p in enumerate(self.params)]

    def _set_buckets(self, buckets: list[list[int]]) -> None:
        """Reducer::initialize_buckets: one flat buffer per bucket, a view of it per parameter."""
        self.buckets, self.bucket_of, self._views = buckets, {}, {}
        self.flat = [torch.empty(sum(self.params[i].numel() for i in b), dtype=self.params[0].dtype,
                                 device=self.device) for b in buckets]
        for b, indices in enumerate(buckets):
            offset = 0
            for i in indices:
                p = self.params[i]
                self.bucket_of[i], self._views[i] = b, self.flat[b][offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    def forward(self, *args, **kwargs):
        if self._ready_order and not self._finished:
            raise RuntimeError("the last backward gave gradients to only some parameters; ScratchDDP, like DDP "
                               "with find_unused_parameters=False, needs every parameter to get one")
        # Reducer::prepare_for_backward: this flag decides what the coming backward does.
        self._syncing = torch.is_grad_enabled() and self.require_backward_grad_sync
        self._pending = [len(b) for b in self.buckets]  # gradients each bucket still waits for
        self._next, self._works, self._ready_order, self._finished = 0, [], [], False
        self._div = self.world_size  # Reducer::set_divide_factor
        self.events = []
        work = Join.notify_join_context(self)  # inside Join: "I still have data" (an all-reduce of ones)
        if work is not None and not self.divide_by_initial_world_size:
            work.wait()
            self._div = int(work.result()[0].item())  # the ranks that still have data
        if self._join_config.enable:
            self._all_reduce_flag(self._syncing)  # tells joined ranks whether to shadow this backward
        if self._syncing:
            self._sync_buffers(active=True)
        return self.module(*args, **kwargs)

    def _grad_ready(self, i: int) -> None:
        """Reducer::autograd_hook and mark_variable_ready: backward has just written ``.grad``."""
        if not self._syncing:
            return  # inside no_sync(): the gradient only accumulates in .grad
        self._log("ready", i)
        self._ready_order.append(i)  # push_rebuilt_params: remembered for the rebuild
        # mark_variable_ready_dense: mul_out(bucket_view, grad, 1 / N), divided while copied;
        # with a comm hook only copied: dividing is then the hook's job, as in torch's allreduce_hook.
        if self._comm_hook is None:
            torch.mul(self.params[i].grad, 1.0 / self._div, out=self._views[i])
        else:
            self._views[i].copy_(self.params[i].grad)
        self._pending[self.bucket_of[i]] -= 1
        # mark_bucket_ready: buckets start in order, so that every rank issues the same
        # collectives in the same order, whatever order its gradients came in.
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch(self._next)
            self._next += 1
        if self._next == len(self.buckets):  # all launched: finish when autograd is done
            Variable._execution_engine.queue_callback(self._finalize_backward)

    def _launch(self, b: int) -> None:
        """Reducer::all_reduce_bucket: the sum over ranks of gradients / N is their average."""
        self._log("launch", b)
        if self._comm_hook is not None:  # Reducer::run_comm_hook: the hook's Future stands for the all-reduce
            state, hook = self._comm_hook
            self._works.append(hook(state, _Bucket(b, self.flat[b], b == len(self.buckets) - 1)))
            return
        work = dist.all_reduce(self.flat[b], group=self.group, async_op=True)  # returns at once
        work.get_future().add_done_callback(lambda _: self._log("reduced", b))  # runs on gloo's thread
        self._works.append(work.get_future())

    def _finalize_backward(self) -> None:
        """Reducer::finalize_backward: autograd is done; wait for every bucket, then copy back."""
        for b, future in enumerate(self._works):
            result = future.wait()
            result = result[0] if isinstance(result, list) else result  # all_reduce's Future holds [tensor]
            if result.data_ptr() != self.flat[b].data_ptr():  # a hook may hand back another tensor
                self.flat[b].copy_(result)
            for i in self.buckets[b]:
                self.params[i].grad.copy_(self._views[i])  # finalize_bucket_dense
        self._log("finalized", -1)
        self._finished = True
        if not self.rebuilt:
            self._rebuild(self._ready_order)

    def _rebuild(self, order: list[int]) -> None:
        """Reducer::rebuild_buckets: buckets in arrival order; sync_bucket_indices: rank 0's order."""
        order_t = torch.tensor(order, dtype=torch.int64, device=self.device)
        self._broadcast([order_t], src=0)
        nbytes = [p.numel() * p.element_size() for p in self.params]
        self._set_buckets(bucket_layout(nbytes, order_t.tolist(), self.caps))
        self.rebuilt = True

    def register_comm_hook(self, state, hook) -> None:
        """DDP's ``register_comm_hook``: ``hook(state, bucket)`` replaces each bucket's all-reduce
        and returns a Future of the reduced bucket (bucket: ``index()``, ``buffer()``, ``is_last()``)."""
        if self._comm_hook is not None:
            raise RuntimeError("register_comm_hook can only be called once (as in DDP)")
        self._comm_hook = (state, hook)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate ``.grad``; enter it before forward (DDP's no_sync)."""
        old, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old

    # ---- collectives shared by construction, forward and the join hook ----

    def _broadcast(self, tensors: list[torch.Tensor], src: int) -> None:
        for t in tensors:
            dist.broadcast(t.detach(), dist.get_global_rank(self.group, src), group=self.group)

    def _all_reduce_flag(self, on: bool) -> bool:
        flag = torch.tensor([float(on)], device=self.device)
        dist.all_reduce(flag, group=self.group)
        return bool(flag.item() > 0)

    def _highest_rank(self, candidate: bool) -> int:
        """DDP's _find_common_rank: the highest group rank among those passing ``candidate=True``."""
        rank = torch.tensor([dist.get_rank(self.group) if candidate else -1], device=self.device)
        dist.all_reduce(rank, op=dist.ReduceOp.MAX, group=self.group)
        return int(rank.item())

    def _sync_buffers(self, active: bool) -> None:
        """DDP's broadcast_buffers: before each synced forward, rank 0's buffers (BatchNorm
        statistics) to all; under Join, the highest rank still training (a joined rank's are stale)."""
        if self.synced_buffers:
            self._broadcast(self.synced_buffers, self._highest_rank(active) if self._join_config.enable else 0)

    def _log(self, what: str, index: int) -> None:
        self.events.append((what, index, time.perf_counter()))

    # ---- Join: uneven inputs (torch.distributed.algorithms.Join) ----

    def join_hook(self, **kwargs) -> JoinHook:
        if self._comm_hook is not None:
            raise RuntimeError("ScratchDDP leaves out Join together with a comm hook")
        """``Join([model], divide_by_initial_world_size=...)`` passes its options here.

        True (the default): gradients are still divided by the initial N, so on a step where only
        k ranks have data the gradient is k/N times their average. False: divided by k."""
        self.divide_by_initial_world_size = kwargs.get("divide_by_initial_world_size", True)
        return _ShadowBackward(self)

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self):
        return self.group


class _Bucket:
    """What a comm hook sees of a bucket: DDP's ``GradBucket``, the parts hooks use."""

    def __init__(self, index: int, flat: torch.Tensor, last: bool):
        self._index, self._flat, self._last = index, flat, last

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._flat

    def is_last(self) -> bool:
        return self._last


class _ShadowBackward(JoinHook):
    """What a rank that ran out of batches does while others still train (DDP's _DDPJoinHook):
    the same collectives as an active rank's forward and backward, contributing zeros."""

    def __init__(self, ddp: ScratchDDP):
        self.ddp = ddp

    def main_hook(self) -> None:
        ddp = self.ddp
        if not ddp._all_reduce_flag(False):
            return  # the active ranks are inside no_sync(): no backward all-reduce to match
        ddp._sync_buffers(active=False)
        for flat in ddp.flat:  # one all-reduce per bucket, in bucket order
            dist.all_reduce(torch.zeros_like(flat), group=ddp.group)
        if not ddp.rebuilt:
            ddp._rebuild(list(range(len(ddp.params))))

    def post_hook(self, is_last_joiner: bool) -> None:
        """DDP's _sync_final_model: every rank takes the model of (the highest) last rank to finish."""
        ddp = self.ddp
        ddp._broadcast(ddp.params + ddp.synced_buffers, src=ddp._highest_rank(is_last_joiner))
