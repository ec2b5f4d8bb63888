"""ddp_demo's own FSDP (``parallel/fsdp.py``, ``ScratchFSDP``) against ``fully_shard``, case by case.

Each case runs on every rank twice with the same data and initial weights: under FSDP2
(``parallel/strategy.py``'s ``wrap``, ``fully_shard`` per block and the root) and under
``ScratchFSDP`` with the same blocks. Each rank holds rows of every parameter; its rows under
ours are held against the same rows under FSDP2 on the same rank (they are the same rows: same
chunking rule). Cases: the gradient shards after one backward; the parameter shards after 5 steps
of SGD with momentum and of Adam; every built-in model, float32 and float64.

Negative controls: ``no reduce-scatter`` (each rank keeps its own chunk of its own gradient)
must miss by ``CONTROL_MARGIN`` tolerances; ``no backward all-gather`` leaves the whole
parameters freed when backward needs them, which autograd refuses with an error naming the
freed storage, for a block whose backward reads its weights (it does not: the first layer, whose
input needs no gradient, and multiply's scalar).

``suite_on_rank`` runs every case of one world size in one set of processes, plus the memory
record (``memory_on_rank``) and the explain view's report (``shards_report``).
"""

from __future__ import annotations

import functools

import torch

from ddp_demo.core.config import DTYPES, OPTIMIZERS
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP, difference
from ddp_demo.parallel import holdings
from ddp_demo.parallel.fsdp import ScratchFSDP
from ddp_demo.parallel.strategy import StrategyConfig, shard_units, wrap
from ddp_demo.proof.equivalence import case_optimizer, case_setup, shard

KINDS = {"grads": 1, **{o: 5 for o in OPTIMIZERS}}  # what a case runs: steps of that optimizer, or one backward
VARIANTS = {"scratch": {}, "no reduce-scatter": {"reduce": False},
            "no backward all-gather": {"gather_in_backward": False}}
FREED = "out of bounds for storage of size 0"  # autograd's words when a saved tensor's storage was freed


def cases(world_size: int, models=MODEL_NAMES, dtypes=tuple(DTYPES)) -> list[tuple]:
    """``(kind, model, dtype, variant)``, variant ``torch`` (FSDP2) first. The controls only where
    N > 1; the no-all-gather one for gradients only (its error comes before any step); the
    reduce-scatter one for steps in float64 only: Adam moves a lone scalar (multiply) by about lr
    whatever its gradient, so in float32 it misses by only ~14 tolerances (proof/cases.py)."""
    out = []
    for m in models:
        for d in dtypes:
            for kind in KINDS:
                out += [(kind, m, d, "torch"), (kind, m, d, "scratch")]
                if world_size > 1 and (kind == "grads" or d == "float64"):
                    out.append((kind, m, d, "no reduce-scatter"))
                if world_size > 1 and kind == "grads":
                    out.append((kind, m, d, "no backward all-gather"))
    return out


def rows(t: torch.Tensor) -> torch.Tensor:
    """A piece as a matrix of rows (a 0-dim parameter is one row)."""
    n = len(t) if t.dim() else 1
    return t.detach().reshape(n, t.numel() // n if n else 0).clone()


def scratch_pieces(sharding: ScratchFSDP) -> dict[str, tuple[int, torch.Tensor]]:
    out = {}
    for block in sharding.blocks:
        for fp in block.params:
            out[f"param/{fp.name}"] = (fp.start, rows(fp.sharded))
            if fp.sharded.grad is not None:
                out[f"grad/{fp.name}"] = (fp.start, rows(fp.sharded.grad))
            out[f"rows/{fp.name}"] = (fp.start, torch.tensor([fp.held, fp.rows]))
    return out


def case_on_rank(ctx: DistContext, case: tuple) -> dict:
    """This rank's pieces after the case: ``{key: (first row, rows)}``, or ``{"error": line}``."""
    kind, model_name, dtype, variant = case
    module, batches, loss_fn = case_setup(model_name, dtype, KINDS[kind])
    make = functools.partial(case_optimizer, "sgd" if kind == "grads" else kind)
    if variant == "torch":
        w = wrap(module, ctx, StrategyConfig("fsdp"), make)
        model, optimizer = w.model, w.optimizer
    else:
        sharding = ScratchFSDP(module, shard_units(module), **VARIANTS[variant])
        model, optimizer = module, make(module.parameters())  # the Module's parameters: the shards
    try:
        for batch in batches:
            x, y = shard(batch, ctx)
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            if kind != "grads":
                optimizer.step()
    except RuntimeError as e:  # every rank fails at the same point: no collective is left half-done
        return {"error": str(e).splitlines()[0]}
    if variant != "torch":
        return scratch_pieces(sharding)
    return {k: (p.start, rows(p.tensor)) for k, p in holdings.pieces(w, ctx).items() if k[:5] in ("param", "grad/")}


def compare(case: tuple, ours: list[dict], fsdp2: list[dict]) -> dict:
    """Ours against FSDP2 on each rank, rows against the same rows: the largest difference, how
    many tolerances that is, whether every row is bit-identical, whether the ranks' rows cover
    every parameter; or the errors."""
    if any("error" in r for r in ours):
        return {"case": case, "errors": [r.get("error") for r in ours]}
    prefix, tol = "grad/" if case[0] == "grads" else "param/", STEP[case[2]]
    diff, off, identical = 0.0, 0.0, True
    for got, want in zip(ours, fsdp2, strict=True):
        for key, (start, mine) in got.items():
            if not key.startswith(prefix) or not len(mine):
                continue  # a rank may hold no rows of a parameter (N > rows)
            first, theirs = want[key]
            theirs = theirs[start - first : start - first + len(mine)]
            d = difference(mine, theirs)
            diff, off = max(diff, d), max(off, d / tol.bound(theirs))
            identical = identical and torch.equal(mine, theirs)
    return {"case": case, "max_abs_diff": diff, "tolerances_off": off, "identical": identical,
            "covered": covered(ours)}


def covered(per_rank: list[dict]) -> bool:
    """Every row of every parameter is held by exactly one rank (the chunks tile dimension 0)."""
    names = {k for k in per_rank[0] if k.startswith("rows/")}
    for name in names:
        spans = sorted((r[name][0], int(r[name][1][0])) for r in per_rank)
        total, end = int(per_rank[0][name][1][1]), 0
        for start, held in spans:
            if held and start != end:
                return False
            end += held
        if end != total:
            return False
    return True


def passes(row: dict) -> bool:
    """Ours: within the tolerance (bit-identity is asserted separately, where stated). A
    reduce-scatter control: off by ``CONTROL_MARGIN`` tolerances. The all-gather control: autograd's
    error about freed storage on every rank, or, where no block's backward reads its weights
    (:data:`BACKWARD_READS_NO_WEIGHTS`), equal."""
    variant = row["case"][3]
    if variant == "no backward all-gather" and row["case"][1] not in BACKWARD_READS_NO_WEIGHTS:
        return "errors" in row and all(e and FREED in e for e in row["errors"])
    if "errors" in row:
        return False
    if variant == "no reduce-scatter":
        return row["tolerances_off"] >= CONTROL_MARGIN
    return row["tolerances_off"] <= 1 and row["covered"]


# multiply: y = m * x with x needing no gradient, so dL/dm = sum(x * dL/dy) never reads m.
BACKWARD_READS_NO_WEIGHTS = ("multiply",)


def compare_all(per_rank: list[dict], case_list: list[tuple]) -> list[dict]:
    """Every case of ours against FSDP2's case of the same kind, model and dtype."""
    def ranks(case: tuple) -> list[dict]:
        return [r["cases"][case] for r in per_rank]

    return [compare(c, ranks(c), ranks((*c[:3], "torch"))) for c in case_list if c[3] != "torch"]


# ---- memory: whole parameters alive, block by block ------------------------------------------

MEMORY_STEPS = 3


def memory_on_rank(ctx: DistContext, model_name: str, reshard_after_forward: bool = True) -> dict:
    """``MEMORY_STEPS`` Adam steps of ``model_name`` (float32) under ScratchFSDP: per step, the
    events with the bytes of whole parameters each block held right after (read from their
    storage), and those bytes again after ``optimizer.step()``; each block's shard bytes and
    whole bytes."""
    module, batches, loss_fn = case_setup(model_name, "float32", MEMORY_STEPS)
    sharding = ScratchFSDP(module, shard_units(module), reshard_after_forward=reshard_after_forward)
    optimizer = case_optimizer("adam", module.parameters())
    steps = []
    for batch in batches:
        sharding.events.clear()
        x, y = shard(batch, ctx)
        optimizer.zero_grad()
        loss_fn(module(x), y).backward()
        optimizer.step()
        steps.append({"events": [(e.what, e.block, dict(e.held)) for e in sharding.events],
                      "after_step": {b.name: b.full_bytes() for b in sharding.blocks}})
    whole = {b.name: sum(fp.gathered.numel() * fp.gathered.element_size() for fp in b.params)
             for b in sharding.blocks}
    return {"steps": steps, "shard_bytes": sharding.shard_bytes(), "whole_bytes": whole}


def only_shards_outside(record: dict) -> list[str]:
    """What breaks the rule: a block holds its whole parameters (then exactly their padded size)
    only during its own forward (all-gather to free) and backward (all-gather to free), and
    none after a step. Empty: the rule holds."""
    broken = []
    for t, step in enumerate(record["steps"]):
        open_blocks: set[str] = set()
        for what, block, held in step["events"]:
            if what.startswith(("all-gather", "backward")):  # its forward or backward begins
                open_blocks.add(block)
            elif what.startswith(("free", "keep whole")):  # it ends
                open_blocks.discard(block)
            for b, nbytes in held.items():
                if nbytes != (record["whole_bytes"][b] if b in open_blocks else 0):
                    broken.append(f"step {t}, after {what} of {block}: {b} holds {nbytes} B of whole parameters")
        broken += [f"step {t}, after the step: {b} holds {n} B" for b, n in step["after_step"].items() if n]
    return broken


def sequence(record: dict) -> list[tuple[str, str]]:
    return [(what, block) for what, block, _ in record["steps"][-1]["events"]]


# ---- one set of processes per world size -----------------------------------------------------


def suite_tasks(world_size: int) -> dict:
    tasks: dict = {"cases": cases(world_size)}
    if world_size == 2:
        tasks["memory"] = [("cnn", True), ("cnn", False)]
    return tasks


def suite_on_rank(ctx: DistContext, tasks: dict) -> dict:
    out = {"cases": {case: case_on_rank(ctx, case) for case in tasks["cases"]}}
    out["memory"] = {m: memory_on_rank(ctx, *m) for m in tasks.get("memory", [])}
    return out

