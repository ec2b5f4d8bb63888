"""What ScratchFSDP did in one step, told from its own hooks: ``ddp_demo.explain --shards``.

    torchrun --standalone --nproc_per_node=2 -m ddp_demo.explain --shards

Every rank trains the article's MLP (float32) for one step under ``ScratchFSDP`` with one block
per Linear layer. Rank 0 prints each rank's shards (which rows of which parameter, in bytes,
padding included), then the step as it happened: each all-gather, free and reduce-scatter, with
the bytes it moved and the whole parameters held right after (``ScratchFSDP.events``). The check
that closes it: every rank's gradient rows equal the same rows of one process's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddp_demo.core.data import builtin_task
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import build_model
from ddp_demo.core.tolerances import STEP, difference
from ddp_demo.parallel.fsdp import ScratchFSDP

PER_RANK = 16


def _setup(world_size: int):
    task = builtin_task("mlp", seed=0, dtype=torch.float32, n_train=PER_RANK * world_size, n_heldout=0)
    torch.manual_seed(0)
    return build_model("mlp", task.x_shape, task.num_classes), task.train.tensors


def shards_report(ctx: DistContext) -> dict:
    """Run on every rank: one forward and backward of this rank's samples under ScratchFSDP."""
    model, (x, y) = _setup(ctx.world_size)
    sharding = ScratchFSDP(model, [model.linear1, model.linear2])
    F.cross_entropy(model(x[ctx.rank :: ctx.world_size]), y[ctx.rank :: ctx.world_size]).backward()
    whole, _ = _setup(1)
    F.cross_entropy(whole(x), y).backward()  # one process, every sample: the reference
    grads = dict(whole.named_parameters())
    shards, diff = [], 0.0
    for block in sharding.blocks:
        for fp in block.params:
            shards.append((block.name, fp.name, fp.start, fp.held, fp.rows, fp.held * fp.row_numel * 4))
            want = grads[fp.name].grad.reshape(fp.rows, -1)[fp.start : fp.start + fp.held]
            diff = max(diff, difference(fp.sharded.grad.reshape(fp.held, -1), want))
    return {"rank": ctx.rank, "shards": shards, "shard_bytes": sharding.shard_bytes(),
            "events": [(e.what, e.block, e.nbytes, e.held) for e in sharding.events], "grad_diff": diff}


def render_shards(reports: list[dict]) -> list[str]:
    n = len(reports)
    lines = [f"The article's MLP (float32) sharded over {n} rank(s), one block per Linear layer;",
             "a parameter of d rows is cut into chunks of ceil(d / N) rows (FSDP2's rule), rank r holds chunk r.", ""]
    for r in reports:
        lines.append(f"[rank {r['rank']}] shards: " + ", ".join(f"{b} {v} B" for b, v in r["shard_bytes"].items())
                     + " (flat, padded)")
        for _, name, start, held, rows, nbytes in r["shards"]:
            span = f"rows {start}..{start + held - 1} of {rows}" if held else f"no rows of {rows}"
            lines.append(f"    {name}: {span} ({nbytes} B)")
    lines += ["", "one step on rank 0 (bytes moved; whole parameters held afterwards):"]
    for what, block, nbytes, held in reports[0]["events"]:
        alive = ", ".join(f"{b} {v} B" for b, v in held.items() if v) or "none"
        moved = f"{nbytes} B" if nbytes else "-"
        lines.append(f"  {what:<24} {block:<8} {moved:>8}   whole: {alive}")
    diff = max(r["grad_diff"] for r in reports)
    ok = diff <= STEP["float32"].atol
    lines.append(f"\nevery rank's gradient rows equal one process's: {'yes' if ok else 'NO'} "
                 f"(max |difference| {diff:.3g})")
    return lines


def checks(reports: list[dict]) -> dict[str, bool]:
    same = all([e[:2] for e in r["events"]] == [e[:2] for e in reports[0]["events"]] for r in reports)
    return {"same sequence on every rank": same,
            "gradients equal one process": max(r["grad_diff"] for r in reports) <= STEP["float32"].atol}
