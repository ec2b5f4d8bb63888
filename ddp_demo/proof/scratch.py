"""ddp_demo's own DDP (``parallel/ddp.py``, ``ScratchDDP``) against torch's, case by case.

Each case runs one of ``equivalence.py``'s rank bodies with the wrapper swapped: gradients
after one step, or parameters after 5 steps of SGD with momentum or of Adam, for a model and
dtype. On each rank the result under ``ScratchDDP`` is compared with the result under
torch's ``DistributedDataParallel``: the same data, the same initial weights, so any
difference is the wrappers'. Twice: with both wrappers' default buckets, and with buckets
so small that every model gets several (rebuilt in the order gradients arrive). The
negative control is ``ScratchDDP`` with its hooks removed: nothing is averaged, and the
same comparison must fail.

``overlap_on_rank`` records, step by step, when each bucket's all-reduce was launched and
when backward finished; ``suite_on_rank`` runs everything one world size needs in one set
of processes (``proof/join.py`` adds uneven inputs).
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo import train
from ddp_demo.core.config import parse_config
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import STEP, max_abs_diff, within
from ddp_demo.parallel.ddp import MIB, ScratchDDP
from ddp_demo.proof import join
from ddp_demo.proof.cases import DTYPE_NAMES, OPTIMIZER_NAMES
from ddp_demo.proof.equivalence import Wrap, case_setup, grads_on_rank, params_on_rank, shard

SMALL_BUCKET_BYTES = 100  # a cap below every weight matrix: several buckets for these models
SMALL_BUCKET_MODELS = ("mlp", "cnn")  # multiply has one parameter: one bucket whatever the cap


def without_hooks(model: torch.nn.Module) -> ScratchDDP:
    """The negative control: ScratchDDP whose gradient hooks were removed, so nothing is averaged."""
    ddp = ScratchDDP(model)
    for handle in ddp.hook_handles:
        handle.remove()
    return ddp


def small_buckets(wrapper: Callable, bucket_bytes: int = SMALL_BUCKET_BYTES) -> Callable:
    """The same bucket cap for torch's DDP and ours (DDP then uses it for the first bucket too)."""
    mb = bucket_bytes / MIB
    extra = {"first_bucket_cap_mb": mb} if wrapper is ScratchDDP else {}
    return functools.partial(wrapper, bucket_cap_mb=mb, **extra)


WRAPPERS: dict[str, Wrap] = {
    "torch": DDP,
    "scratch": ScratchDDP,
    "scratch, hooks removed": without_hooks,
    "torch, small buckets": small_buckets(DDP),
    "scratch, small buckets": small_buckets(ScratchDDP),
}
# What is compared with what on each rank, (ours, torch's), by check: the same bucket layout
# on both sides; another layout (our small buckets, torch's one default bucket); the control.
CHECKS = {"same buckets": [("scratch", "torch"), ("scratch, small buckets", "torch, small buckets")],
          "other buckets": [("scratch, small buckets", "torch")],
          "hooks removed": [("scratch, hooks removed", "torch")]}
MARGIN = 100  # the control must miss by at least this many times the tolerance


def cases(world_size: int, models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[tuple]:
    """``("grads", model, dtype, wrapper)`` and ``("params", model, dtype, optimizer, wrapper)``.
    Small buckets only where a model has several parameters; the control only where N > 1."""
    out = []
    for m in models:
        for d in dtypes:
            for w in WRAPPERS:
                if ("small" in w and m not in SMALL_BUCKET_MODELS) or ("hooks" in w and world_size == 1):
                    continue
                out += [("grads", m, d, w)] + [("params", m, d, o, w) for o in OPTIMIZER_NAMES]
    return out


def run_case(ctx: DistContext, case: tuple) -> dict[str, torch.Tensor]:
    kind, model, dtype, *optimizer, wrapper = case
    if kind == "grads":
        return grads_on_rank(ctx, model, dtype, wrap=WRAPPERS[wrapper])
    return params_on_rank(ctx, model, dtype, optimizer[0], wrap=WRAPPERS[wrapper])


def compare(per_rank: list[dict], case_list: list[tuple]) -> list[dict]:
    """One row per (check, case under ours, rank): its difference from the case under torch's DDP."""
    rows = []
    for check, pairs in CHECKS.items():
        for ours, theirs in pairs:
            for case in (c for c in case_list if c[-1] == ours):
                for rank, results in enumerate(per_rank):
                    got, want = results["cases"][case], results["cases"][case[:-1] + (theirs,)]
                    rows.append({"check": check, "case": case, "rank": rank, "max_abs_diff": max_abs_diff(got, want),
                                 "close": within(got, want, STEP[case[2]]),
                                 "identical": all(torch.equal(got[k], want[k]) for k in want)})
    return rows


def passes(check: str, rows: list[dict]) -> bool:
    """Same buckets: bit-identical. Other buckets: within the tolerances. The control (hooks
    removed; rows of one case on every rank): fails the comparison by at least ``MARGIN`` x atol."""
    if check == "same buckets":
        return all(r["identical"] for r in rows)
    if check == "other buckets":
        return all(r["close"] for r in rows)
    atol = STEP[rows[0]["case"][2]].atol
    return not all(r["close"] for r in rows) and max(r["max_abs_diff"] for r in rows) >= MARGIN * atol


# ---- overlap: when each bucket's all-reduce starts, against the end of backward ----------------

OVERLAP_STEPS = 4


def overlap_on_rank(ctx: DistContext, bucket_bytes: int) -> list[dict]:
    """The CNN, ``OVERLAP_STEPS`` steps under ScratchDDP with buckets of ``bucket_bytes``;
    per step, the wrapper's events in milliseconds since ``backward()`` was called."""
    model, batches, loss_fn = case_setup("cnn", "float32", steps=OVERLAP_STEPS)
    ddp = small_buckets(ScratchDDP, bucket_bytes)(model)
    steps = []
    for batch in batches:
        x, y = shard(batch, ctx)
        loss = loss_fn(ddp(x), y)
        buckets = len(ddp.buckets)  # this backward's; the first backward rebuilds them as it ends
        start = time.perf_counter()
        loss.backward()
        returned = time.perf_counter()
        steps.append({"buckets": buckets, "backward_returned_ms": (returned - start) * 1e3,
                      "events": [(what, i, (t - start) * 1e3) for what, i, t in ddp.events]})
    return steps


def timeline(step: dict) -> dict:
    """One step's launch times against the end of backward's computation (its last gradient)."""
    events = step["events"]
    launches = [t for what, _, t in events if what == "launch"]
    return {"buckets": step["buckets"], "launch_ms": launches,
            "launch_order": [i for what, i, _ in events if what == "launch"],
            "reduced_ms": [t for _, t in sorted((i, t) for what, i, t in events if what == "reduced")],
            "last_gradient_ms": max(t for what, _, t in events if what == "ready"),
            "backward_returned_ms": step["backward_returned_ms"]}


def overlapped(step: dict) -> bool:
    """The first bucket's all-reduce was launched before backward had computed its last gradient."""
    t = timeline(step)
    return t["launch_ms"][0] < t["last_gradient_ms"]


# ---- one set of processes per world size ---------------------------------------------------------


def train_on_rank(ctx: DistContext, argv: list[str]) -> dict:
    """A whole ``ddp_demo.train`` run with these flags in this process group (the launcher's
    part aside, the same code as under torchrun); rank 0 returns the weights and losses it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config([*argv, "--out", f"{tmp}/out"])
        cfg.check_batch_split(ctx.world_size)
        failed = None
        try:
            train.run(cfg, train.make_task(cfg), ctx)
        except train.RunFailed as e:
            failed = str(e)
        if not ctx.is_main:
            return {"failed": failed}
        losses = [json.loads(line)["loss"] for line in open(f"{tmp}/out/metrics.jsonl")]
        return {"failed": failed, "final": torch.load(f"{tmp}/out/final.pt", weights_only=True), "losses": losses}


# What one set of processes per world size runs (tests/test_scratch_ddp.py, ddp_demo.verify --scratch).
OVERLAP_BUCKET_BYTES = (100, 10**9)  # several buckets for the CNN; one (the overlap control)
JOIN_WORLD_SIZE = 3  # ranks with 2, 3 and 4 batches: steps with 3, 2 and 1 ranks still training
NO_JOIN_TIMEOUT_S = 2.0
TRAIN_FLAGS = ["--model", "mlp", "--dtype", "float64", "--steps", "30", "--global-batch-size", "16", "--seed", "4"]
RUNS = {2: {"torch": [*TRAIN_FLAGS, "--ddp", "torch"],
            "unsynced": [*TRAIN_FLAGS, "--ddp", "scratch", "--skip-grad-sync"]},
        4: {"scratch, K=2": [*TRAIN_FLAGS, "--ddp", "scratch", "--grad-accum-steps", "2"]}}


def suite_tasks(world_size: int, models=MODEL_NAMES, runs: bool = True) -> dict:
    """Every case at every N; overlap and the no-Join control at N = 2; Join at N = 3; the
    trainer's whole runs (``RUNS``) at N = 2 and 4."""
    tasks: dict = {"cases": cases(world_size, models), "train": RUNS.get(world_size, {}) if runs else {}}
    if world_size == 2:
        tasks |= {"overlap": OVERLAP_BUCKET_BYTES, "no_join": (list(join.WRAPPERS), NO_JOIN_TIMEOUT_S)}
    if world_size == JOIN_WORLD_SIZE:
        tasks["join"] = join.cases(models)
    return tasks


def suite_on_rank(ctx: DistContext, tasks: dict) -> dict:
    """Run what ``tasks`` names: ``cases`` (always), ``overlap`` (bucket sizes), ``train``
    (trainer flags by name), ``join`` (uneven-input cases) and ``no_join`` (the hang, bounded;
    last, as it leaves its process groups broken)."""
    out = {"cases": {case: run_case(ctx, case) for case in tasks.get("cases", [])}}
    out["train"] = {name: train_on_rank(ctx, argv) for name, argv in tasks.get("train", {}).items()}
    if "overlap" in tasks:
        out["overlap"] = {b: overlap_on_rank(ctx, b) for b in tasks["overlap"]}
    if "join" in tasks:
        out["join"] = {case: join.join_on_rank(ctx, *case) for case in tasks["join"]}
    if "no_join" in tasks:
        out["no_join"] = join.without_join_on_rank(ctx, *tasks["no_join"])
    return out
