"""ZeRO and FSDP2 on N ranks against one process, slice by slice.

The same cases as the DDP proof (``proof/equivalence.py``: one Module, one seed, global batches
of 24 dealt ``r::N``), run under a strategy (``parallel/strategy.py``). Each rank returns the
pieces it holds (``parallel/holdings.py``): under fsdp a slice of every parameter, gradient
and optimizer state; under zero whole parameters and gradients but only its share of the
optimizer state. Each piece is held against the same rows of one process's tensor, by the one
rule of ``core/tolerances.py`` (per tensor: the scale is the whole tensor's largest value), and
the pieces of all ranks must cover every row (so a rank that returned nothing cannot pass).

A :class:`ShardCase`'s ``kind``:

- ``grads``: one forward/backward; the gradients;
- ``steps``: 5 steps of SGD with momentum or Adam; the parameters, the optimizer state, and rank
  0's ``full_state_dict`` (``full/NAME``);
- ``accum``: one backward over ``k`` micro-batches (``Wrapped.grad_sync``); the gradients, and
  after each micro-batch whether they were averaged (only after the last: its control);
- ``bn``: a BatchNorm model, 3 SGD steps under fsdp, ``layer`` ``plain`` (statistics per rank: the
  buffers drift apart, which ``holdings.buffers_differing`` names) or ``sync``
  (``ddp_demo.convert_sync_batchnorm``: one process's statistics);
- ``bytes``: what a rank holds after one step of a small float32 MLP whose rows do not split
  evenly (``holdings.held_bytes``, as ``bench.memory`` counts).

``reduce=False`` is the negative control: nothing is averaged (``StrategyConfig.reduce_grads``),
and the comparison must miss by ``CONTROL_MARGIN`` tolerances.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ddp_demo.core.accumulate import GradSync, accumulate_gradients
from ddp_demo.core.config import DTYPES
from ddp_demo.core.dist import DistContext, all_ranks_equal
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import STEP, difference
from ddp_demo.parallel import holdings
from ddp_demo.parallel.strategy import StrategyConfig, Wrapped, full_state_dict, wrap
from ddp_demo.proof.cases import DTYPE_NAMES, OPTIMIZER_NAMES
from ddp_demo.proof.equivalence import GLOBAL_BATCH, SEED, case_optimizer, case_setup, shard

SHARDED = ("zero", "fsdp")
STEPS = {"grads": 1, "accum": 1, "steps": 5, "bn": 3, "bytes": 1}
ACCUM_K = 2  # micro-batches: 24 / (N * 2) is whole for N = 1..4
NOTES = ("differing", "reduced")  # what a rank reports besides its pieces
ONE = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


class ShardCase(NamedTuple):
    """One case of the sharded proof (module docstring)."""

    kind: str  # grads, steps, accum, bn or bytes
    strategy: str  # ddp, zero or fsdp
    model: str = ""  # a built-in model; "" for bn and bytes, which bring their own
    dtype: str = "float64"
    optimizer: str = "sgd"
    reduce: bool = True  # False: the negative control
    k: int = 1  # micro-batches (accum)
    layer: str = ""  # bn: plain or sync

    @property
    def synced(self) -> bool:
        """Should this case equal one process? (False: a control, which must miss.)"""
        return self.layer != "plain" and self.reduce


def cases(strategies=SHARDED, models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[ShardCase]:
    out = []
    for s in strategies:
        for m in models:
            for d in dtypes:
                out += [ShardCase("grads", s, m, d), ShardCase("grads", s, m, d, reduce=False)]
                out += [ShardCase("steps", s, m, d, o) for o in OPTIMIZER_NAMES]
                # Controls in float64 only, as for DDP (proof/cases.py: Adam's lone scalar in float32).
                out += [ShardCase("steps", s, m, d, o, reduce=False) for o in OPTIMIZER_NAMES if d == "float64"]
            out.append(ShardCase("accum", s, m, k=ACCUM_K))
    return out


def bn_cases() -> list[ShardCase]:
    return [ShardCase("bn", "fsdp", layer=layer) for layer in ("plain", "sync")]


def bytes_cases(strategies=("ddp", *SHARDED), optimizers=OPTIMIZER_NAMES) -> list[ShardCase]:
    return [ShardCase("bytes", s, dtype="float32", optimizer=o) for s in strategies for o in optimizers]


def setup(case: ShardCase) -> tuple[nn.Module, list, object]:
    """The case's Module (as built, before any wrapping), its global batches and its loss."""
    if case.kind not in ("bn", "bytes"):
        return case_setup(case.model, case.dtype, STEPS[case.kind])
    g, dtype = torch.Generator().manual_seed(SEED), DTYPES[case.dtype]
    torch.manual_seed(SEED)
    if case.kind == "bn":
        module = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    else:  # 7 and 5 rows: uneven at N = 2, 3 and 4
        module = bytes_model()
    features = module[0].in_features
    batches = [(torch.randn(GLOBAL_BATCH, features, generator=g, dtype=dtype) * 2 + 1,
                torch.randint(0, module[-1].out_features, (GLOBAL_BATCH,), generator=g))
               for _ in range(STEPS[case.kind])]
    return module, batches, nn.functional.cross_entropy


def bytes_model() -> nn.Sequential:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5))


def train(w: Wrapped, batches, loss_fn, ctx: DistContext | None, k: int, step: bool, seen: list | None = None) -> None:
    """This rank's share of each batch (all of it without ``ctx``) through ``w``, as the trainer's
    loop runs it (``accumulate_gradients``), stepping if asked. ``seen`` gets, after each
    micro-batch's backward, whether the gradients were averaged (:func:`reduced`)."""
    for batch in batches:
        x, y = shard(batch, ctx) if ctx is not None else batch
        w.optimizer.zero_grad()
        sync = w.grad_sync(k) if seen is None else watched(w, ctx, k, seen)
        accumulate_gradients(w.model, x, y, loss_fn, k, sync)
        if step:
            w.optimizer.step()


def watched(w: Wrapped, ctx: DistContext, k: int, seen: list) -> GradSync:
    """``w.grad_sync(k)``, noting after each backward whether it averaged the gradients."""
    sync = w.grad_sync(k)

    def backward(loss: torch.Tensor) -> None:
        sync.backward(loss)
        seen.append(reduced(w, ctx))

    return GradSync(sync.context, backward)


def reduced(w: Wrapped, ctx: DistContext) -> bool:
    """Did the last backward average the gradients? A sharded parameter's shard has received one
    (FSDP2 keeps an unreduced gradient on the whole parameter until then); whole parameters'
    gradients are the same on every rank."""
    params = list(w.module.parameters())
    whole = [p.grad.reshape(-1) for p in params if not isinstance(p, DTensor)]
    return all(p.grad is not None for p in params if isinstance(p, DTensor)) and \
        (not whole or all_ranks_equal(torch.cat(whole), ctx))


def compared(case: ShardCase, w: Wrapped, ctx: DistContext) -> dict:
    """What a case holds against one process: gradients, or parameters, state and buffers."""
    held = holdings.pieces(w, ctx) | {f"buffer/{n}": holdings.Piece(0, b.detach().clone())
                                      for n, b in w.module.named_buffers() if b.is_floating_point()}
    if case.kind == "steps":
        held |= {f"full/{k}": holdings.Piece(0, v) for k, v in (full_state_dict(w, ctx) or {}).items()}
    wanted = ("grad/",) if case.kind in ("grads", "accum") else ("param/", "state/", "buffer/", "full/")
    return {k: v for k, v in held.items() if k.startswith(wanted)}


def case_on_rank(ctx: DistContext, case: ShardCase) -> dict:
    module, batches, loss_fn = setup(case)
    if case.layer == "sync":
        from ddp_demo.parallel.sync_batchnorm import convert_sync_batchnorm

        module = convert_sync_batchnorm(module)
    w = wrap(module, ctx, StrategyConfig(case.strategy, reduce_grads=case.reduce),
             functools.partial(case_optimizer, case.optimizer))
    seen: list[bool] = []
    train(w, batches, loss_fn, ctx, case.k, case.kind in ("steps", "bn", "bytes"), seen if case.k > 1 else None)
    if case.kind == "bytes":
        names = {id(p): n for n, p in module.named_parameters()}
        return {"held": holdings.held_bytes(w), "owned": [names[id(p)] for p in holdings.optimizer_state(w.optimizer)]}
    out = compared(case, w, ctx) | ({"reduced": seen} if case.kind == "accum" else {})
    return out | {"differing": holdings.buffers_differing(module, ctx)} if case.kind == "bn" else out


def reference(case: ShardCase) -> dict[str, torch.Tensor]:
    """One process on the whole batch, the same steps, keyed as a rank's pieces: the same for
    every strategy, world size, control and (bn) layer, so computed once for all of them."""
    return _one_process(case._replace(strategy="one process", reduce=True, k=1, layer=""))


@functools.cache  # callers only read it
def _one_process(case: ShardCase) -> dict[str, torch.Tensor]:
    module, batches, loss_fn = setup(case)
    w = Wrapped("one process", module, module, case_optimizer(case.optimizer, module.parameters()))
    train(w, batches, loss_fn, None, 1, step=case.kind in ("steps", "bn"))
    return {key: piece.tensor for key, piece in compared(case, w, ONE).items()}


def cases_on_rank(ctx: DistContext, case_list: list[ShardCase]) -> dict[ShardCase, dict]:
    """Every case in one set of processes (start-up costs seconds; a case, milliseconds)."""
    return {case: case_on_rank(ctx, case) for case in case_list}


def uncovered(per_rank: list[dict], want: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``want`` some row of which no rank holds."""
    missing = []
    for key, full in want.items():
        rows = torch.zeros(len(full) if full.dim() else 1, dtype=torch.bool)
        for held in per_rank:
            if key in held:
                p = held[key]
                rows[p.start : p.start + (len(p.tensor) if p.tensor.dim() else 1)] = True
        if not rows.all():
            missing.append(key)
    return missing


def judged(held: dict, want: dict[str, torch.Tensor], dtype: str) -> dict:
    """Largest difference, tolerances off and within, for one rank's pieces: each against the
    same rows of one process's tensor, bounded by that whole tensor's scale (``Tolerance.bound``)."""
    tol, diff, off = STEP[dtype], 0.0, 0.0
    for key, piece in held.items():
        if key in NOTES or not piece.tensor.numel():  # a rank may hold no rows of a tensor (N > rows)
            continue
        full = want[key]
        d = difference(piece.tensor, full if full.dim() == 0 else full[piece.start : piece.start + len(piece.tensor)])
        diff, off = max(diff, d), max(off, d / tol.bound(full))
    return {"max_abs_diff": diff, "tolerances_off": off, "close": off <= 1.0}


def compare(case: ShardCase, per_rank: list[dict]) -> list[dict]:
    """One row per rank: largest difference, tolerances off, within tolerance; what no rank held."""
    want = reference(case)
    missing = uncovered(per_rank, want)
    return [{"world_size": len(per_rank), "case": case, "rank": rank, "synced": case.synced, "uncovered": missing,
             **{note: held.get(note, []) for note in NOTES}, **judged(held, want, case.dtype)}
            for rank, held in enumerate(per_rank)]


def run_cases(world_size: int, case_list: list[ShardCase], timeout: float = 240) -> tuple[dict, dict]:
    """Every case on ``world_size`` ranks: ``({case: rows}, {bytes case: [per rank]})``."""
    per_rank = run_on_ranks(cases_on_rank, world_size, (case_list,), timeout=timeout)
    rows = {c: compare(c, [r[c] for r in per_rank]) for c in case_list if c.kind != "bytes"}
    return rows, {c: [r[c] for r in per_rank] for c in case_list if c.kind == "bytes"}
