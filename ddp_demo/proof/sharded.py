"""ZeRO and FSDP2 on N ranks against one process, slice by slice.

The same cases as the DDP proof (``proof/equivalence.py``: one Module, one seed, global batches
of 24 dealt ``r::N``), run under a strategy (``parallel/strategy.py``). Each rank returns the
pieces it holds (``parallel/holdings.py``): under fsdp a slice of every parameter, gradient
and optimizer state; under zero whole parameters and gradients but only its share of the
optimizer state. Each piece is held against the same rows of one process's tensor, and the
pieces of all ranks must cover every row (so a rank that returned nothing cannot pass).

A case is a tuple:

- ``("grads", strategy, model, dtype, reduce)``: one forward/backward; the gradients;
- ``("steps", strategy, model, dtype, optimizer, reduce)``: 5 steps of SGD with momentum or
  Adam; the parameters, the optimizer state, and rank 0's ``full_state_dict`` (``full/NAME``);
- ``("accum", strategy, model, dtype, k)``: one backward over k micro-batches
  (``Wrapped.grad_sync``); the gradients, and after each micro-batch whether they were
  averaged (only after the last: the accumulation's control);
- ``("bn", "fsdp", layer, dtype)``: a BatchNorm model, 3 SGD steps, ``layer`` ``plain``
  (statistics per rank: the buffers drift apart, which ``holdings.buffers_differing`` names) or
  ``sync`` (``ddp_demo.convert_sync_batchnorm``: one process's statistics);
- ``("bytes", strategy, optimizer)``: what a rank holds after one step of a small float32
  MLP whose rows do not split evenly (``holdings.held_bytes``, as ``bench.memory`` counts).

``reduce=False`` is the negative control: nothing is averaged (``StrategyConfig.reduce_grads``),
and the comparison must miss by ``CONTROL_MARGIN`` tolerances.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ddp_demo.core.accumulate import GradSync, accumulate_gradients
from ddp_demo.core.config import DTYPES
from ddp_demo.core.dist import DistContext, all_ranks_equal
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.parallel import holdings
from ddp_demo.parallel.strategy import StrategyConfig, Wrapped, full_state_dict, wrap
from ddp_demo.proof.cases import DTYPE_NAMES, OPTIMIZER_NAMES, max_abs_diff, tolerances_off, within_tolerance
from ddp_demo.proof.equivalence import GLOBAL_BATCH, SEED, case_optimizer, case_setup, shard
from ddp_demo.proof.spawn import run_on_ranks

SHARDED = ("zero", "fsdp")
STEPS = {"grads": 1, "accum": 1, "steps": 5, "bn": 3}
ACCUM_K = 2  # micro-batches: 24 / (N * 2) is whole for N = 1..4
NOTES = ("differing", "reduced")  # what a rank reports besides its pieces
ONE = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


def cases(strategies=SHARDED, models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[tuple]:
    out = []
    for s in strategies:
        for m in models:
            for d in dtypes:
                out += [("grads", s, m, d, True), ("grads", s, m, d, False)]
                out += [("steps", s, m, d, o, True) for o in OPTIMIZER_NAMES]
                # Controls in float64 only, as for DDP (proof/cases.py: Adam's lone scalar in float32).
                out += [("steps", s, m, d, o, False) for o in OPTIMIZER_NAMES if d == "float64"]
            out.append(("accum", s, m, "float64", ACCUM_K))
    return out


def bn_cases() -> list[tuple]:
    return [("bn", "fsdp", layer, "float64") for layer in ("plain", "sync")]


def bytes_cases(strategies=("ddp", *SHARDED), optimizers=OPTIMIZER_NAMES) -> list[tuple]:
    return [("bytes", s, o) for s in strategies for o in optimizers]


def setup(case: tuple) -> tuple[nn.Module, list, object]:
    """The case's Module (as built, before any wrapping), its global batches and its loss."""
    kind, _, model, dtype, *_ = case
    if kind == "bn":
        g = torch.Generator().manual_seed(SEED)
        torch.manual_seed(SEED)
        module = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DTYPES[dtype])
        batches = [(torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=DTYPES[dtype]) * 2 + 1,
                    torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS["bn"])]
        return module, batches, nn.functional.cross_entropy
    return case_setup(model, dtype, STEPS[kind])


def settings(case: tuple) -> tuple[str, int, bool]:
    """(optimizer, micro-batches, reduce gradients) of a case."""
    kind, *rest = case
    if kind == "steps":
        return rest[3], 1, rest[4]
    if kind == "grads":
        return "sgd", 1, rest[3]
    return "sgd", (rest[3] if kind == "accum" else 1), True


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


def compared(case: tuple, w: Wrapped, ctx: DistContext) -> dict:
    """What a case holds against one process: gradients, or parameters, state and buffers."""
    held = holdings.pieces(w, ctx) | {f"buffer/{n}": holdings.Piece(0, b.detach().clone())
                                      for n, b in w.module.named_buffers() if b.is_floating_point()}
    if case[0] == "steps":
        held |= {f"full/{k}": holdings.Piece(0, v) for k, v in (full_state_dict(w, ctx) or {}).items()}
    wanted = ("grad/",) if case[0] in ("grads", "accum") else ("param/", "state/", "buffer/", "full/")
    return {k: v for k, v in held.items() if k.startswith(wanted)}


def case_on_rank(ctx: DistContext, case: tuple) -> dict:
    module, batches, loss_fn = setup(case)
    if case[0] == "bn" and case[2] == "sync":
        from ddp_demo.parallel.sync_batchnorm import convert_sync_batchnorm

        module = convert_sync_batchnorm(module)
    optimizer, k, reduce = settings(case)
    w = wrap(module, ctx, StrategyConfig(case[1], reduce_grads=reduce), functools.partial(case_optimizer, optimizer))
    seen: list[bool] = []
    train(w, batches, loss_fn, ctx, k, case[0] in ("steps", "bn"), seen if case[0] == "accum" else None)
    out = compared(case, w, ctx)
    if case[0] == "accum":
        out["reduced"] = seen
    return out | {"differing": holdings.buffers_differing(module, ctx)} if case[0] == "bn" else out


def reference(case: tuple) -> dict[str, torch.Tensor]:
    """One process on the whole batch, the same steps, keyed as a rank's pieces: the same for
    every strategy, world size, control and (bn) layer, so computed once for all of them."""
    kind, _, model, dtype, *_ = case
    return _one_process(kind, "" if kind == "bn" else model, dtype, settings(case)[0])


@functools.cache  # callers only read it
def _one_process(kind: str, model: str, dtype: str, optimizer: str) -> dict[str, torch.Tensor]:
    case = (kind, "one process", model, dtype)
    module, batches, loss_fn = setup(case)
    w = Wrapped("one process", module, module, case_optimizer(optimizer, module.parameters()))
    train(w, batches, loss_fn, None, 1, step=kind in ("steps", "bn"))
    return {key: piece.tensor for key, piece in compared(case, w, ONE).items()}


def bytes_model() -> nn.Module:
    """7 and 5 rows: uneven at N = 2, 3 and 4."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5))


def bytes_on_rank(ctx: DistContext, case: tuple) -> dict:
    """The bytes this rank holds after one step; the parameters whose optimizer state it keeps."""
    _, strategy, optimizer = case
    module = bytes_model()
    w = wrap(module, ctx, StrategyConfig(strategy), functools.partial(case_optimizer, optimizer))
    g = torch.Generator().manual_seed(SEED)
    batch = (torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g))
    train(w, [batch], nn.functional.cross_entropy, ctx, 1, step=True)
    names = {id(p): n for n, p in module.named_parameters()}
    kept = holdings.optimizer_state(w.optimizer)
    return {"held": holdings.held_bytes(w), "owned": [names[id(p)] for p in kept]}


def cases_on_rank(ctx: DistContext, case_list: list[tuple]) -> dict[tuple, dict]:
    """Every case in one set of processes (start-up costs seconds; a case, milliseconds)."""
    return {case: (bytes_on_rank if case[0] == "bytes" else case_on_rank)(ctx, case) for case in case_list}


def slices(got: dict[str, holdings.Piece], want: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows of one process's tensors that each piece holds."""
    return {k: want[k] if want[k].dim() == 0 else want[k][p.start : p.start + len(p.tensor)] for k, p in got.items()}


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


def differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> dict:
    if not got:
        return {"max_abs_diff": 0.0, "close": True, "tolerances_off": 0.0}
    return {"max_abs_diff": max_abs_diff(got, want), "close": within_tolerance(got, want, dtype),
            "tolerances_off": tolerances_off(got, want, dtype)}


def compare(case: tuple, per_rank: list[dict]) -> list[dict]:
    """One row per rank: largest difference, tolerances off, within tolerance; what no rank held."""
    want, dtype = reference(case), case[3]
    missing = uncovered(per_rank, want)
    synced = case[2] == "sync" if case[0] == "bn" else settings(case)[2]
    rows = []
    for rank, held in enumerate(per_rank):
        # A rank may hold no rows of a tensor (N > rows): nothing of it to compare there.
        got = {k: v for k, v in held.items() if k not in NOTES and v.tensor.numel()}
        theirs, mine = slices(got, want), {k: p.tensor for k, p in got.items()}
        rows.append({"world_size": len(per_rank), "case": case, "rank": rank, "synced": synced,
                     "uncovered": missing, **{note: held.get(note, []) for note in NOTES},
                     **differences(mine, theirs, dtype)})
    return rows


def run_cases(world_size: int, case_list: list[tuple], timeout: float = 240) -> tuple[dict, dict]:
    """Every case on ``world_size`` ranks: ``({case: rows}, {bytes case: [per rank]})``."""
    per_rank = run_on_ranks(cases_on_rank, world_size, (case_list,), timeout=timeout)
    rows = {c: compare(c, [r[c] for r in per_rank]) for c in case_list if c[0] != "bytes"}
    return rows, {c: [r[c] for r in per_rank] for c in case_list if c[0] == "bytes"}
