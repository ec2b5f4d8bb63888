"""Why the training step on N processes did not equal one process's: causes read from what each
rank's step did (``trace.py``) and from the numbers, never from the step's source text.

- a forward through ``model.module``: DDP's forward never ran, so its hooks never averaged;
- every micro-batch in ``no_sync``, the last one too: the gradients stayed local;
- the loss not divided over K micro-batches: the gradient the optimizer saw is K times one process's;
- the learning rate scaled by N: the optimizer stepped with N times one process's rate;
- randomness that depends on the rank: a generator (torch's, numpy's, Python's) whose state differs
  between ranks when a step begins, and that the step draws from;
- clipping or editing (weight decay added to ``.grad``, say) gradients that are still local.
"""

from __future__ import annotations

import math

import torch

from ddp_demo.check.verdict import Cause, Verdict, World
from ddp_demo.core.tolerances import difference


def _traced(v: Verdict) -> list[tuple[World, int, int, dict]]:
    """(world, rank, step number, what that step did) for every step every rank ran."""
    return [(w, r, i + 1, s) for w in v.worlds if w.ranks for r, res in enumerate(w.ranks)
            for i, s in enumerate(res.get("trace", []))]


def _first(found: list[tuple[World, int, int, dict]]) -> str:
    w, r, i, _ = found[0]
    return f"N={w.world_size}, rank {r}, step {i}"


def module_forward(v: Verdict) -> Cause | None:
    if v.plan.strategy == "fsdp":  # fsdp's hooks live on the Module itself: there is nothing to bypass
        return None
    found = [t for t in _traced(v) if any(not via for via, _ in t[3]["forwards"])]
    if not found:
        return None
    return Cause("module_forward", f"forward through model.module: DDP's hooks never fired ({_first(found)})",
                 "DDP averages gradients from hooks its own forward sets up; model.module(x) runs your Module "
                 "without them, so each rank stepped on its own gradient",
                 "call the wrapper, model(x); keep model.module for saving and loading weights")


def all_in_no_sync(v: Verdict) -> Cause | None:
    found = [t for t in _traced(v) if t[3]["forwards"] and not any(sync for _, sync in t[3]["forwards"])]
    if not found:
        return None
    k = len(found[0][3]["forwards"])
    return Cause("last_in_no_sync", f"the last micro-batch ran in no_sync: {k} of {k} forwards without gradient "
                 f"sync ({_first(found)})", "no_sync() turns DDP's all-reduce off; with every micro-batch inside "
                 "it the gradients are never averaged and each rank steps on its own",
                 "run the last micro-batch's forward and backward outside no_sync()")


def gradient_ratio(v: Verdict, w: World) -> float | None:
    """The r with (the gradient rank 0's optimizer saw) = r x one process's, tensor by tensor, if one fits."""
    got, want = w.ranks[0]["grads"], v.reference.grads
    pairs = [(n, got.get(n), g) for n, g in want.items() if g is not None]
    if not pairs or any(a is None for _, a, _ in pairs) or not any(bool(g.any()) for *_, g in pairs):
        return None
    r = sum(float((a * g).sum()) for _, a, g in pairs) / sum(float((g * g).sum()) for *_, g in pairs)
    tol = {row.name: row.tolerance for row in w.rows if row.stage == "gradient"}
    if any(difference(a, r * g) > max(1.0, abs(r)) * tol[n] for n, a, g in pairs):
        return None
    return r


def undivided(v: Verdict) -> Cause | None:
    k = v.target.recipe.accumulate
    failing = [w for w in v.worlds if w.ranks and not w.numbers_match]
    ratios = [gradient_ratio(v, w) for w in failing]
    if k == 1 or not failing or not all(r is not None and math.isclose(r, k, rel_tol=1e-6) for r in ratios):
        return None
    return Cause("undivided_loss", f"the loss is not divided over the {k} micro-batches: the gradient the "
                 f"optimizer saw is {ratios[0]:.6g} x one process's",
                 f"backward adds up the K = {k} micro-batches' gradients; one process, stepping once on the "
                 "whole batch, has one mean", "divide each micro-batch's loss by K before backward: "
                 "(loss / len(micro_batches)).backward()")


def lr_scaled(v: Verdict) -> Cause | None:
    ratios = {w.world_size: w.ranks[0]["lrs"][0] / v.reference.lrs[0] for w in v.worlds
              if w.ranks and w.ranks[0].get("lrs") and v.reference.lrs}
    if not ratios or not all(math.isclose(r, n, rel_tol=1e-9) and n > 1 for n, r in ratios.items()):
        return None
    shown = ", ".join(f"{r:g} at N={n}" for n, r in ratios.items())
    return Cause("lr_scaled", f"the learning rate is scaled by N: the optimizer stepped with N x one process's "
                 f"rate ({shown})", "the global batch is the same B samples as one process's, so its step "
                 "must be too; scaling the rate with N is for a global batch that grows with N",
                 "keep one process's learning rate (scale it only if you grow the global batch with N)")


def rank_randomness(v: Verdict) -> Cause | None:
    names = set()
    for w in v.worlds:
        for start in zip(*(r.get("trace", []) for r in (w.ranks or [])), strict=False):
            for gen in start[0]["rng"]:
                differ = len({s["rng"].get(gen) for s in start}) > 1
                drawn = any(s["rng"].get(gen) != s.get("rng_end", {}).get(gen) for s in start)
                if differ and drawn:
                    names.add(gen)
    if not names:
        return None
    shown = ", ".join(f"{'Python random' if g == 'random' else g}" for g in sorted(names))
    return Cause("rank_randomness", f"randomness that depends on the rank: {shown} (the generator's state differs "
                 "between ranks when a step begins, and the step draws from it)",
                 "seeded with the rank, each rank draws other numbers than one process draws for the same samples",
                 "seed every rank alike (e.g. np.random.seed(0), not seed + rank) for what must match one process; "
                 "per-sample noise differs from one process anyway: check with it off", sorted(names))


def local_gradients(v: Verdict) -> Cause | None:
    clipped = [t for t in _traced(v) if any(t[3]["clips"])]
    edited = sorted({n for t in _traced(v) for n in t[3]["edited"]})
    if not clipped and not edited:
        return None
    what = ["clip_grad_norm_ on local gradients"] * bool(clipped) + \
        [f"gradients edited while local: {', '.join(edited)}"] * bool(edited)
    return Cause("local_gradients", f"clipping or weight decay on local gradients: {'; '.join(what)}",
                 "between a no_sync backward and the next forward the gradients are this rank's own partial "
                 "sums; clipping or decaying them there is not what one process does to the whole batch's",
                 "clip and decay once, after the last micro-batch's backward has averaged the gradients "
                 "(or use the optimizer's weight_decay)", edited)


STEP_DETECTORS = (module_forward, all_in_no_sync, undivided, lr_scaled, rank_randomness, local_gradients)


def step_causes(v: Verdict) -> list[Cause]:
    with torch.no_grad():
        return [c for c in (detect(v) for detect in STEP_DETECTORS) if c]
