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
backward runs under ``no_sync``; a model that is not torch's DDP), the pair falls back to
one explicit ``all_reduce`` (or to the local values when there is no group at all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

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
        self._room: dict[tuple, torch.Tensor] = {}  # bucket 0 plus two numbers, reused every step
        if carry and isinstance(model, DDP):  # accelerate's prepared model is torch's DDP too
            model.register_comm_hook(model.process_group, self._hook)

    def begin(self, stop: bool) -> None:
        self.losses, self.stop, self.carried = [], stop, None

    def note(self, loss: torch.Tensor) -> None:
        """A micro-batch's mean loss, noted before its backward (which may be the synced one)."""
        self.losses.append(loss.detach())

    def _hook(self, group, bucket):  # (ProcessGroup | None, dist.GradBucket) -> Future[Tensor]
        # No annotations: DDP checks them against the real classes, and this module's
        # ``from __future__ import annotations`` would turn them into strings.
        group = group or dist.group.WORLD
        grads = bucket.buffer()
        if bucket.index() != 0 or not self.losses:  # torch's allreduce_hook: average by dividing first, then sum
            grads.div_(group.size())
            return dist.all_reduce(grads, group=group, async_op=True).get_future().then(lambda f: f.value()[0])
        n = grads.numel()
        both = self._room.get((n, grads.dtype))
        if both is None:
            both = self._room[(n, grads.dtype)] = torch.empty(n + 2, dtype=grads.dtype, device=grads.device)
        torch.div(grads, group.size(), out=both[:n])  # one pass, as the default hook's in-place division
        both[n].copy_(torch.stack(self.losses).mean())
        both[n + 1].fill_(float(self.stop))  # a fill, not a host-to-device copy: no CUDA sync
        both[n:].div_(group.size())
        self.carried = both[n:]
        return dist.all_reduce(both, group=group, async_op=True).get_future().then(lambda f: f.value()[0][:n])

    def result(self) -> torch.Tensor:
        """``[mean loss over the global batch, > 0 if any rank asked to stop]`` on this rank's device."""
        if self.carried is not None:
            return self.carried
        pair = torch.stack([torch.stack(self.losses).mean().to(torch.float64),
                            torch.full((), float(self.stop), dtype=torch.float64, device=self.device)])
        if dist.is_initialized():  # no hook ran this step: one all-reduce of its own
            dist.all_reduce(pair)
            pair /= self.world_size
        return pair
