"""What every rank must agree on after each step, carried by DDP's own gradient all-reduce.

After a step every rank needs the same two numbers: the loss of the whole global batch
(the mean of the ranks' means: what is logged, and what decides whether the update may
be applied) and whether any rank was asked to stop (so all ranks stop at the same step).
A separate ``all_reduce`` of those two numbers costs a latency-bound collective per step,
on this machine about as much as the gradients' own (issue 13: the trainer took 1.08x a
bare DDP loop's time because of it).

So they ride along with the gradients. DDP lets a *communication hook* replace how each
gradient bucket is all-reduced (DDP communication hooks docs,
https://pytorch.org/docs/stable/ddp_comm_hooks.html). :func:`Agreement._hook` does what
torch's default ``allreduce_hook`` does (divide by N, sum), except for bucket 0, which it
all-reduces with two more numbers appended: this rank's loss and stop flag. Bucket 0 is
the first one DDP reduces and the one it keeps small on purpose (``first_bucket_bytes_cap``),
so the copy that makes room for two numbers is cheap. After ``backward()`` has returned,
DDP has waited for every bucket, so the agreed pair is there, with no collective of its own.

Where no hook runs (plain ``python`` with no process group; ``--skip-grad-sync``, whose
backward runs under ``no_sync``; a model that takes no comm hooks), the pair falls back to
one explicit ``all_reduce`` (or to the local values when there is no group at all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ddp_demo.core.dist import DistContext


class Agreement:
    """Collects this rank's loss and stop flag; hands back the pair all ranks agree on."""

    def __init__(self, model: torch.nn.Module, ctx: DistContext, carry: bool = True):
        """``carry=False`` agrees by an all-reduce of its own every step, as the trainer did
        before issue 13 (the benchmark measures both; the tests count the collectives)."""
        self.world_size, self.device = ctx.world_size, ctx.device
        self.losses: list[torch.Tensor] = []  # this step's micro-batch losses (detached), before the synced backward
        self.stop = False
        self.carried: torch.Tensor | None = None  # the agreed pair, once bucket 0 has carried it this step
        self._room: dict[tuple, tuple] = {}  # bucket 0 plus two numbers, and views into it, reused every step
        self._pending: list[tuple] = []  # this backward's (all-reduce work, what DDP gets back), in bucket order
        self._futures: list[torch.futures.Future] = []  # handed to DDP for every bucket but the last
        # torch's DDP (accelerate's prepared model is one too) and ddp_demo's ScratchDDP both take hooks
        if carry and hasattr(model, "register_comm_hook"):
            model.register_comm_hook(model.process_group, self._hook)

    def begin(self, stop: bool) -> None:
        self.losses, self.stop, self.carried = [], stop, None
        self._pending, self._futures = [], []  # nothing left over from a backward that raised midway

    def note(self, loss: torch.Tensor) -> None:
        """A micro-batch's mean loss (detached), noted before its backward (which may be the synced one)."""
        self.losses.append(loss)

    def mean_loss(self) -> torch.Tensor:
        return self.losses[0] if len(self.losses) == 1 else torch.stack(self.losses).mean()

    def _hook(self, group, bucket):  # (ProcessGroup | None, dist.GradBucket) -> Future[Tensor]
        # No annotations: DDP checks them against the real classes, and this module's
        # ``from __future__ import annotations`` would turn them into strings.
        #
        # Every bucket's all-reduce starts here, asynchronously, in bucket order, as DDP's own
        # would; the hook hands DDP a Future that it completes itself in the last bucket's call,
        # once every all-reduce of this backward has finished. DDP waits for the Futures only
        # after the last bucket has been handed over, so nothing waits earlier than it would
        # without a hook. (The usual ``work.get_future().then(...)`` costs a Python callback on
        # gloo's thread, which must take the GIL: about 0.1 ms per bucket here, issue 13.)
        group = group or dist.group.WORLD
        grads, size = bucket.buffer(), group.size()
        if bucket.index() == 0 and self.losses:
            sent, result = self._with_pair(grads, size)
        else:  # torch's allreduce_hook: average by dividing first, then sum
            sent, result = grads.div_(size), grads
        # The process group's own method: what dist.all_reduce calls, without its Python checks.
        self._pending.append((group.allreduce([sent]), result))
        if not bucket.is_last():
            future = torch.futures.Future(devices=[grads.device] if grads.is_cuda else None)
            self._futures.append(future)
            return future
        for work, _ in self._pending:
            work.wait()  # on CUDA: the current stream waits for the collective's, no host sync
        for future, (_, value) in zip(self._futures, self._pending, strict=False):
            future.set_result(value)
        done = torch.futures.Future(devices=[grads.device] if grads.is_cuda else None)
        done.set_result(result)
        self._pending, self._futures = [], []
        return done

    def _with_pair(self, grads: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket 0 plus this rank's loss and stop flag, all divided by N (as torch's hook
        divides before the sum): the buffer to all-reduce, and the view of it DDP gets back."""
        n = grads.numel()
        if (n, grads.dtype) not in self._room:
            both = torch.empty(n + 2, dtype=grads.dtype, device=grads.device)
            self._room[(n, grads.dtype)] = both, both[:n], both[n], both[n + 1], both[n:]
        both, room_grads, room_loss, room_stop, pair = self._room[(n, grads.dtype)]
        # The gradients in one pass (as torch's in-place division), the loss and the flag
        # beside them. The flag is a fill, not a host-to-device copy, so there is no CUDA sync.
        torch.div(grads, size, out=room_grads)
        torch.div(self.mean_loss(), size, out=room_loss)
        room_stop.fill_(float(self.stop) / size)
        self.carried = pair
        return both, room_grads

    def result(self) -> torch.Tensor:
        """``[mean loss over the global batch, > 0 if any rank asked to stop]`` on this rank's device."""
        if self.carried is not None:
            return self.carried
        pair = torch.stack([self.mean_loss().to(torch.float64),
                            torch.full((), float(self.stop), dtype=torch.float64, device=self.device)])
        if dist.is_initialized():  # no hook ran this step: one all-reduce of its own
            dist.all_reduce(pair)
            pair /= self.world_size
        return pair
