"""SyncBatchNorm on N ranks equals one process's BatchNorm on the whole batch.

Each case is ``(layer, dtype, shape, split)``: ``layer`` is ``"sync"`` (a BatchNorm layer
converted with ``ddp_demo.convert_sync_batchnorm``) or ``"plain"`` (the negative control:
BatchNorm left as it is); ``shape`` is ``"BC"`` (BatchNorm1d on ``(B, C)``) or ``"BCHW"``
(BatchNorm2d); ``split`` deals the global batch ``r::N`` (``"even"``, as DistributedSampler
does) or in contiguous pieces of different sizes, one of them empty at N = 4 (``"uneven"``).

One set of 4 processes runs every world size: N = 1, 2, 3 use the process groups of ranks
0..N-1 (``dist.new_group``), since starting processes costs seconds and a case milliseconds.
Every rank of the group wraps the layer in DDP over that group and runs two forward/backward
steps on its share of two seeded global batches, with ``loss = sum(y * g)`` for a seeded
upstream gradient ``g``, so the single-process loss is the sum of the ranks' losses whatever
their sizes.
:func:`sync_bn_cases_on_rank` returns what a rank holds after that; :func:`compare` holds it
against one process: outputs and input gradients of step 1 (put back in global order),
weight and bias gradients of step 1 (DDP averages them, so N times the rank's equals one
process's sum), and the running statistics after step 2.

    python -m ddp_demo.proof.sync_batchnorm     # the table; tests/test_sync_batchnorm.py asserts it
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo.core.config import DTYPES
from ddp_demo.core.dist import DistContext
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import STEP, difference
from ddp_demo.parallel.sync_batchnorm import convert_sync_batchnorm

BATCH, CHANNELS, SEED = 20, 3, 7
UNEVEN = {1: [20], 2: [7, 13], 3: [2, 7, 11], 4: [0, 3, 8, 9]}  # samples per rank, in order


def cases(world_size: int) -> list[tuple]:
    out = [("sync", d, s, split) for d in DTYPES for s in ("BC", "BCHW") for split in ("even", "uneven")]
    # The control needs every rank to hold at least 2 samples: plain BatchNorm refuses fewer.
    return out + [("plain", d, s, "even") for d in DTYPES for s in ("BC", "BCHW")] if world_size > 1 else out


def indices(split: str, rank: int, world_size: int) -> torch.Tensor:
    if split == "even":
        return torch.arange(rank, BATCH, world_size)
    start = sum(UNEVEN[world_size][:rank])
    return torch.arange(start, start + UNEVEN[world_size][rank])


def case_data(dtype: str, shape: str) -> dict:
    """The layer's initial state and two global batches with their upstream gradients."""
    g = torch.Generator().manual_seed(SEED)
    size = (BATCH, CHANNELS) if shape == "BC" else (BATCH, CHANNELS, 4, 5)
    shift = torch.tensor([0.0, 3.0, -1.5]).view(1, -1, *[1] * (len(size) - 2))  # channels off centre
    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    data = {"weight": 1 + 0.3 * rand(CHANNELS), "bias": 0.2 * rand(CHANNELS),
            "x": [2 * rand(*size) + shift for _ in range(2)], "g": [rand(*size) for _ in range(2)]}
    return {k: [t.to(DTYPES[dtype]) for t in v] if isinstance(v, list) else v.to(DTYPES[dtype])
            for k, v in data.items()}


def make_layer(layer: str, dtype: str, shape: str, data: dict, group=None) -> nn.Module:
    bn = (nn.BatchNorm1d if shape == "BC" else nn.BatchNorm2d)(CHANNELS, momentum=0.1).to(DTYPES[dtype])
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    return convert_sync_batchnorm(bn, group) if layer == "sync" else bn


def run_case(rank: int, world_size: int, group, case: tuple) -> dict[str, torch.Tensor]:
    layer, dtype, shape, split = case
    data, idx = case_data(dtype, shape), indices(split, rank, world_size)
    bn = make_layer(layer, dtype, shape, data, group)
    ddp, out = DDP(bn, process_group=group), {}
    for step in range(2):
        x = data["x"][step][idx].clone().requires_grad_(True)
        y = ddp(x)
        (y * data["g"][step][idx]).sum().backward()
        if step == 0:
            out.update(y=y.detach(), dx=x.grad, dw=bn.weight.grad.clone(), db=bn.bias.grad.clone())
    return {**out, "running_mean": bn.running_mean, "running_var": bn.running_var}


def sync_bn_cases_on_rank(ctx: DistContext, world_sizes: tuple[int, ...]) -> dict[int, dict[tuple, dict]]:
    """``{N: {case: this rank's tensors}}`` for every N this rank takes part in."""
    out = {}
    for n in world_sizes:
        group = dist.new_group(list(range(n)))  # every rank must join the creation of every group
        if ctx.rank < n:
            out[n] = {case: run_case(ctx.rank, n, group, case) for case in cases(n)}
    return out


def run_all(world_sizes: tuple[int, ...] = (1, 2, 3, 4), timeout: float = 200) -> dict[int, dict[tuple, dict]]:
    """``{N: {case: compare(...)}}``: every case at every N, on one set of ``max(world_sizes)`` processes."""
    per_rank = run_on_ranks(sync_bn_cases_on_rank, max(world_sizes), (world_sizes,), timeout=timeout)
    return {n: {case: compare(case, [per_rank[r][n][case] for r in range(n)]) for case in cases(n)}
            for n in world_sizes}


def reference(case: tuple) -> dict[str, torch.Tensor]:
    """One process, plain BatchNorm, the whole batch: what every rank must add up to."""
    _, dtype, shape, _ = case
    data = case_data(dtype, shape)
    bn, out = make_layer("plain", dtype, shape, data), {}
    for step in range(2):
        x = data["x"][step].clone().requires_grad_(True)
        y = bn(x)
        (y * data["g"][step]).sum().backward()
        if step == 0:
            out.update(y=y.detach(), dx=x.grad, dw=bn.weight.grad.clone(), db=bn.bias.grad.clone())
    return {**out, "running_mean": bn.running_mean, "running_var": bn.running_var}


def gathered(case: tuple, per_rank: list[dict], rank: int) -> dict[str, torch.Tensor]:
    """What one process would hold, assembled from the ranks: everyone's outputs and input
    gradients in global order, and ``rank``'s own weight/bias gradients and running statistics."""
    world_size, split = len(per_rank), case[3]
    full = {}
    for key in ("y", "dx"):
        t = torch.empty((BATCH, *per_rank[0][key].shape[1:]), dtype=per_rank[0][key].dtype)
        for r, res in enumerate(per_rank):
            t[indices(split, r, world_size)] = res[key]
        full[key] = t
    mine = per_rank[rank]
    return {**full, "dw": world_size * mine["dw"], "db": world_size * mine["db"],  # DDP averaged the sums
            "running_mean": mine["running_mean"], "running_var": mine["running_var"]}


def compare(case: tuple, per_rank: list[dict], want: dict[str, torch.Tensor] | None = None) -> dict:
    """The largest difference from one process over every rank and quantity, and whether all
    are within the step tolerances of ``core/tolerances.py`` (its one rule: per tensor)."""
    want = reference(case) if want is None else want
    worst, close = (0.0, ""), True
    for rank in range(len(per_rank)):
        got = gathered(case, per_rank, rank)
        for key, w in want.items():
            diff = difference(got[key], w)
            worst = max(worst, (diff, key))
            close &= diff <= STEP[case[1]].bound(w)
    return {"max_abs_diff": worst[0], "worst": worst[1], "close": close}


def main() -> int:
    """``python -m ddp_demo.proof.sync_batchnorm``: every case's largest difference, N = 1 to 4."""
    ok = True
    print(f"{'N':>2}  {'layer':<6} {'dtype':<8} {'shape':<5} {'split':<7} {'max |N ranks - one process|':>28}  verdict")
    for n, rows in run_all().items():
        for (layer, dtype, shape, split), got in rows.items():
            good = got["close"] if layer == "sync" else not got["close"]  # the control must miss
            ok &= good
            verdict = ("match" if layer == "sync" else "differs (control)") if good else "FAIL"
            print(f"{n:>2}  {layer:<6} {dtype:<8} {shape:<5} {split:<7} {got['max_abs_diff']:>28.3g}  {verdict}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
