"""What ScratchDDP did during a backward, told from its own hooks: ``ddp_demo.explain --buckets``.

    torchrun --standalone --nproc_per_node=2 -m ddp_demo.explain --buckets

Every rank trains the article's MLP for two steps under ``ScratchDDP`` with small buckets
(``BUCKET_BYTES``), and beside it a copy under torch's DDP with the same bucket cap. Rank 0
prints the bucket layout of each backward, then the second backward as it happened: when each
gradient became ready, when each bucket's all-reduce was launched and when it completed
(recorded by the wrapper: ``ScratchDDP.events``). Two checks close it: torch's DDP built the
same buckets, and both wrappers left the same gradients.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.data import builtin_task
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import build_model
from ddp_demo.parallel.ddp import MIB, ScratchDDP

BUCKET_BYTES = 256  # small enough to split the MLP's 1.7 KB of float32 gradients into two buckets
STEPS = 2  # the first backward uses one bucket; the buckets are rebuilt after it
PER_RANK = 16


def torch_buckets(ddp: DDP) -> list[list[int]] | None:
    """DDP's current buckets as parameter indices, read from its Reducer (a private API: None without it)."""
    index = {id(p): i for i, p in enumerate(ddp.module.parameters())}
    try:
        buckets = ddp.reducer._get_zeros_like_grad_buckets()
    except AttributeError:
        return None
    return [[index[id(p)] for p in bucket.parameters()] for bucket in buckets]


def bucket_report(ctx: DistContext, bucket_bytes: int = BUCKET_BYTES) -> dict:
    """Run on every rank: ``STEPS`` steps of this rank's batches under ScratchDDP and torch's DDP."""
    task = builtin_task("mlp", seed=0, dtype=torch.float32, n_train=PER_RANK * ctx.world_size * STEPS, n_heldout=0)
    torch.manual_seed(0)
    model = build_model("mlp", task.x_shape, task.num_classes)
    twin = copy.deepcopy(model)
    ours = ScratchDDP(model, bucket_cap_mb=bucket_bytes / MIB, first_bucket_cap_mb=bucket_bytes / MIB)
    theirs = DDP(twin, bucket_cap_mb=bucket_bytes / MIB)
    x, y = (t[ctx.rank :: ctx.world_size] for t in task.train.tensors)  # DistributedSampler's layout
    steps = []
    for step in range(STEPS):
        xs, ys = x[step * PER_RANK : (step + 1) * PER_RANK], y[step * PER_RANK : (step + 1) * PER_RANK]
        model.zero_grad(), twin.zero_grad()
        loss, buckets = F.cross_entropy(ours(xs), ys), ours.buckets
        start = time.perf_counter()
        loss.backward()
        steps.append({"buckets": buckets, "events": [(what, i, (t - start) * 1e3) for what, i, t in ours.events]})
        F.cross_entropy(theirs(xs), ys).backward()
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    return {"rank": ctx.rank, "names": ours.names, "nbytes": [p.numel() * p.element_size() for p in ours.params],
            "steps": steps, "rebuilt": ours.buckets, "torch_rebuilt": torch_buckets(theirs), "max_diff": diff}


def layout_lines(buckets: list[list[int]], names: list[str], nbytes: list[int]) -> list[str]:
    return [f"  bucket {b}: " + ", ".join(f"{names[i]} ({nbytes[i]} B)" for i in bucket)
            + f" = {sum(nbytes[i] for i in bucket)} B" for b, bucket in enumerate(buckets)]


def event_line(what: str, i: int, ms: float, r: dict, buckets: list[list[int]]) -> str:
    if what == "ready":
        b = next(b for b, bucket in enumerate(buckets) if i in bucket)
        return f"  {ms:7.3f} ms  gradient ready: {r['names'][i]:<15} -> bucket {b}"
    if what == "launch":
        return f"  {ms:7.3f} ms  bucket {i}: all-reduce launched (async; backward goes on)"
    if what == "reduced":
        return f"  {ms:7.3f} ms  bucket {i}: all-reduce completed (on gloo's thread)"
    return f"  {ms:7.3f} ms  end of backward: every bucket waited for, averages copied into .grad"


def render(reports: list[dict], bucket_bytes: int = BUCKET_BYTES) -> list[str]:
    """What rank 0 prints, from every rank's report."""
    r = reports[0]
    first, second = r["steps"][0], r["steps"][-1]
    lines = [f"ScratchDDP (ddp_demo/parallel/ddp.py) on the MLP, {len(reports)} ranks, buckets capped at "
             f"{bucket_bytes} bytes", "",
             "backward 1: the order gradients arrive in is not known yet, so one bucket holds every parameter:",
             *layout_lines(first["buckets"], r["names"], r["nbytes"]),
             "after it, the buckets are rebuilt in the order the gradients arrived (rank 0's, for every rank):",
             *layout_lines(second["buckets"], r["names"], r["nbytes"]), "",
             f"backward {len(r['steps'])} on rank 0, in milliseconds since backward() was called:"]
    lines += [event_line(*event, r, second["buckets"]) for event in sorted(second["events"], key=lambda e: e[2])]
    yes = {True: "yes", False: "NO"}
    ok = checks(reports)
    lines += ["", f"every rank saw the gradients arrive in the same order: {yes[ok['same order']]}",
              f"torch's DDP with the same bucket cap built the same buckets: {yes[ok['same buckets']]}",
              f"every rank's gradients equal torch DDP's: {yes[ok['same gradients']]} "
              f"(max |difference| {max(x['max_diff'] for x in reports):.3g})"]
    return lines


def checks(reports: list[dict]) -> dict[str, bool]:
    orders = {tuple(i for what, i, _ in x["steps"][-1]["events"] if what == "ready") for x in reports}
    return {"same order": len(orders) == 1, "same buckets": all(x["rebuilt"] == x["torch_rebuilt"] for x in reports),
            "same gradients": all(x["max_diff"] == 0 for x in reports)}
