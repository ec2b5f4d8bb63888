"""The peak bytes of parameters one rank holds during a step: DDP, FSDP2 and ddp_demo's ScratchFSDP.

    python -m ddp_demo.bench param-peak                  # 8 x Linear(512, 512), float32, N = 2 and 4
    python -m ddp_demo.bench param-peak --quick          # a tiny model: checks the pipeline

``bench memory`` counts what a rank holds after a step; sharding's cost is what it holds during
one: a block's whole parameters while the block computes. Here every rank samples, at every
module's forward entry and exit and again when backward reaches it (a hook on its output), the
bytes of parameter storage alive: under DDP the Module's parameters; under ScratchFSDP the
shards plus the whole parameters its blocks hold (``ShardedBlock.full_bytes``); under FSDP2 the
shards plus its all-gather outputs (read from FSDP2's private ``FSDPParam.all_gather_outputs``,
read only). The table shows the largest rank's peak. Expected, with P the parameters' bytes and
B the largest block's: DDP P; both FSDPs P / N + B at these points (one block whole at a time;
FSDP2's backward prefetch could hold two, but on gloo it is no earlier than these samples see).
Measured (load 4.8 on 2 cores): DDP 8404992 B at N = 2 and 4; FSDP2 and ScratchFSDP the same,
5253120 B (0.625 P) at N = 2 and 3151872 B (0.375 P) at N = 4.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from ddp_demo.core.dist import DistContext
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.parallel.fsdp import ScratchFSDP
from ddp_demo.parallel.strategy import StrategyConfig, shard_units, wrap

IMPLS = ("ddp", "fsdp2", "scratch fsdp")


def job_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def _storage(tensors) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in seen.items() if n)


def alive_counter(impl: str, module: nn.Module, sharding: ScratchFSDP | None):
    """A function returning the bytes of parameter storage this rank holds now."""
    if impl == "ddp":
        return lambda: _storage(module.parameters())
    if impl == "scratch fsdp":
        return lambda: sum(sharding.shard_bytes().values()) + sum(b.full_bytes() for b in sharding.blocks)
    groups = [m._get_fsdp_state()._fsdp_param_group for m in module.modules() if hasattr(m, "_get_fsdp_state")]
    params = [fp for g in groups if g is not None for fp in g.fsdp_params]
    return lambda: _storage([fp._sharded_param_data for fp in params]
                            + [t for fp in params for t in fp.all_gather_outputs])


def sample_everywhere(module: nn.Module, count, peaks: list[int]) -> None:
    """Sample ``count()`` at each module's forward entry and exit and when backward reaches it."""
    def on_grad(grad):
        peaks.append(count())

    def after(m, args, out):
        peaks.append(count())
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(on_grad)

    for m in module.modules():
        m.register_forward_pre_hook(lambda m, args: peaks.append(count()))
        m.register_forward_hook(after)


def peak_on_rank(ctx: DistContext, impl: str, width: int, depth: int) -> dict:
    module, sharding = job_model(width, depth), None
    if impl == "scratch fsdp":
        sharding = ScratchFSDP(module, shard_units(module))
        model, optimizer = module, torch.optim.Adam(module.parameters(), lr=1e-4)
    else:
        w = wrap(module, ctx, StrategyConfig("ddp" if impl == "ddp" else "fsdp"),
                 lambda p: torch.optim.Adam(p, lr=1e-4))
        model, optimizer = w.model, w.optimizer
    peaks: list[int] = []
    sample_everywhere(module, alive_counter(impl, module, sharding), peaks)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(ctx.rank))
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return {"peak": max(peaks), "floor": min(peaks)}


def measure(width: int, depth: int, world_sizes: list[int]) -> list[dict]:
    rows = []
    for n in world_sizes:
        for impl in IMPLS:
            per_rank = run_on_ranks(peak_on_rank, n, (impl, width, depth), timeout=300)
            rows.append({"impl": impl, "world_size": n, "peak": max(r["peak"] for r in per_rank),
                         "floor": max(r["floor"] for r in per_rank)})
    return rows


def render(rows: list[dict], width: int, depth: int) -> str:
    p = 4 * depth * (width * width + width)
    lines = [f"{depth} x Linear({width}, {width}), float32: P = {p} B, one block B = {p // depth} B; per rank, "
             "the largest; bytes of parameter storage alive",
             "| impl | N | peak during a step | least during a step | peak / P |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['impl']} | {r['world_size']} | {r['peak']} | {r['floor']} | {r['peak'] / p:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.bench param-peak", description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512, help="features of every Linear layer")
    parser.add_argument("--depth", type=int, default=8, help="number of Linear layers (one block each)")
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated N (default 2,4)")
    parser.add_argument("--quick", action="store_true", help="a tiny model (width 16, depth 3)")
    args = parser.parse_args(argv)
    width, depth = (16, 3) if args.quick else (args.width, args.depth)
    load = os.getloadavg()
    print(render(measure(width, depth, [int(n) for n in args.world_sizes.split(",")]), width, depth))
    print(f"load average before: {load[0]:.2f}; {os.cpu_count()} cores, torch {torch.__version__}, gloo")
    return 0
