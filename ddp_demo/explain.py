"""Watch DDP reconcile one gradient: the article's MultiplyByTwo, x split across ranks.

    torchrun --standalone --nproc_per_node=2 -m ddp_demo.explain
    python -m ddp_demo.explain                    # one process: nothing to reconcile
    torchrun --standalone --nproc_per_node=2 -m ddp_demo.explain --buckets   # inside DDP: buckets, overlap
    torchrun --standalone --nproc_per_node=2 -m ddp_demo.explain --shards    # inside FSDP: shards, gathers

Each rank runs ``multiplier * x_shard`` on its own device and calls backward on the
mean of its shard. A DDP communication hook sees the gradient bucket exactly as
backward produced it, records it, and only then all-reduces it: what is printed as
"before" is the tensor DDP was about to send, not a recomputation.
"""

import argparse
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.dist import DistContext, setup, teardown
from ddp_demo.core.env import launch_env
from ddp_demo.core.models import MultiplyByTwo
from ddp_demo.parallel import fsdp_timeline
from ddp_demo.parallel.timeline import bucket_report, checks, render

PER_RANK = 2


def record_then_average(recorded: list, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook: keep a copy of the local gradients, then average over ranks.

    Averaging (divide by N, all-reduce sum) is what DDP's built-in hook does.
    """
    recorded.append(bucket.buffer().clone())
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def record_only(recorded: list, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The negative control: the same hook without the all-reduce (no reconciliation)."""
    recorded.append(bucket.buffer().clone())
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def rank_report(ctx: DistContext, skip_allreduce: bool) -> dict:
    """Run one forward/backward on this rank's shard; return what happened."""
    x = torch.arange(1, PER_RANK * ctx.world_size + 1, dtype=torch.float64)
    shard = x[ctx.rank * PER_RANK : (ctx.rank + 1) * PER_RANK].to(ctx.device)
    model = MultiplyByTwo().to(ctx.device, torch.float64)
    ddp = DDP(model)
    recorded: list[torch.Tensor] = []
    ddp.register_comm_hook(recorded, record_only if skip_allreduce else record_then_average)
    ddp(shard).mean().backward()  # the hook runs inside this call
    return {
        "rank": ctx.rank,
        "device": str(ctx.device),
        "shard": shard.tolist(),
        "before": recorded[0].item(),
        "after": model.multiplier.grad.item(),
    }


def single_process_gradient(world_size: int) -> tuple[list[float], float]:
    x = torch.arange(1, PER_RANK * world_size + 1, dtype=torch.float64)
    model = MultiplyByTwo().to(torch.float64)
    model(x).mean().backward()
    return x.tolist(), model.multiplier.grad.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp_demo.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-allreduce", action="store_true",
                        help="negative control: record the local gradients but never all-reduce them")
    parser.add_argument("--buckets", action="store_true",
                        help="instead: the MLP under ddp_demo's own DDP, its gradient buckets and the order "
                        "gradients became ready and buckets were reduced during one backward")
    parser.add_argument("--shards", action="store_true",
                        help="instead: the MLP under ddp_demo's own FSDP, each rank's shards and the all-gathers, "
                        "frees and reduce-scatters of one step")
    args = parser.parse_args(argv)
    env = launch_env()
    # One process still gets a (single-member) group, so DDP and the hook run the same code.
    ctx = setup(env, device="auto", store=dist.HashStore() if env.world_size == 1 else None)
    try:
        reports: list = [None] * ctx.world_size
        view = bucket_report if args.buckets else fsdp_timeline.shards_report if args.shards else None
        dist.all_gather_object(reports, view(ctx) if view else rank_report(ctx, args.skip_allreduce))
    finally:
        teardown()
    if not ctx.is_main:
        return 0
    if args.buckets:
        print("\n".join(render(reports)))
        return 0 if all(checks(reports).values()) else 1
    if args.shards:
        print("\n".join(fsdp_timeline.render_shards(reports)))
        return 0 if all(fsdp_timeline.checks(reports).values()) else 1
    x, full = single_process_gradient(ctx.world_size)
    print(f"MultiplyByTwo: y = multiplier * x with multiplier = 2.0; x = {x} split over {ctx.world_size} rank(s);")
    print("each rank computes loss = mean(y over its shard), so d loss / d multiplier = mean(its shard)\n")
    for r in reports:  # gathered to rank 0, printed in rank order
        print(f"[rank {r['rank']}] device {r['device']}: shard {r['shard']}; gradient before all-reduce "
              f"{r['before']:g}, after {'(no all-reduce) ' if args.skip_allreduce else ''}{r['after']:g}")
    diff = max(abs(r["after"] - full) for r in reports)
    equal = diff <= 1e-12
    print(f"\nsingle process on the whole x: gradient {full:g} = mean(x)")
    print(f"every rank's gradient equals the single-process gradient: {'yes' if equal else 'NO'} "
          f"(max |difference| {diff:.3g})")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
