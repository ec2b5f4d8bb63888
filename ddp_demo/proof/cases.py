"""The equivalence checks as data: which cases run, how close is close, what passes.

``run_cases`` runs a list of cases on N processes (``core.spawn.run_on_ranks``) and
compares every rank with one process (``equivalence.reference_*``); ``case_ok`` and
``accum_ok`` turn those rows into verdicts, including the negative controls, which
must *fail* the comparison. ``python -m ddp_demo.verify`` prints them as a table;
the tests assert them case by case.
"""

from __future__ import annotations

import functools

import torch

from ddp_demo.core.config import DTYPES, OPTIMIZERS
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.proof.equivalence import (
    GLOBAL_BATCH,
    accum_cases_on_rank,
    all_cases_on_rank,
    reference_grads,
    reference_params,
    trainer_params_on_rank,
)

# The tolerances the tests hold DDP to (docs/equivalence.md).
TOLERANCE = {"float64": {"atol": 1e-12, "rtol": 0.0}, "float32": {"atol": 1e-6, "rtol": 1e-5}}
# A negative control must miss by at least this many tolerances: failing by a hair would
# not show that the check separates synced from unsynced training.
CONTROL_MARGIN = 100
DTYPE_NAMES = tuple(DTYPES)
OPTIMIZER_NAMES = OPTIMIZERS


def cases(models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[tuple]:
    out = []
    for m in models:
        for d in dtypes:
            out += [("grads", m, d, True), ("grads", m, d, False)]
            # 5 steps; "trainer" takes them through the trainer's own loader (shuffled), wrap and loop
            out += [(k, m, d, o, True) for k in ("params", "trainer") for o in OPTIMIZER_NAMES]
            # Their controls in float64 only: Adam moves a lone scalar (multiply) by about lr * sign(grad)
            # whatever the gradient's size, so unsynced it misses by ~3e-4, only ~14 float32 tolerances.
            if d == "float64":
                out += [(k, m, d, o, False) for k in ("params", "trainer") for o in OPTIMIZER_NAMES]
    return out


ONE_PROCESS = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


@functools.cache  # the same for every world size: computed once per case (callers only read it)
def reference(case: tuple) -> dict[str, torch.Tensor]:
    """What one process computes on the whole batch (``trainer``: the trainer's own code, unwrapped)."""
    kind, model, dtype, *rest = case
    if kind == "grads":
        return reference_grads(model, dtype)
    if kind == "params":
        return reference_params(model, dtype, rest[0])
    return trainer_params_on_rank(ONE_PROCESS, model, dtype, rest[0])


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def within_tolerance(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> bool:
    tol = TOLERANCE[dtype]
    return all(torch.allclose(got[k], want[k], **tol) for k in want)


def tolerances_off(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> float:
    """How many tolerances apart the two are: the largest ``|got - want| / (atol + rtol * |want|)``.
    At most 1 is within tolerance; a negative control must reach ``CONTROL_MARGIN``."""
    tol = TOLERANCE[dtype]
    return max(float(((got[k] - want[k]).abs() / (tol["atol"] + tol["rtol"] * want[k].abs())).max()) for k in want)


def run_cases(world_size: int, case_list: list[tuple], timeout: float = 240) -> list[dict]:
    """Run every case on ``world_size`` ranks; one row per (case, rank)."""
    per_rank = run_on_ranks(all_cases_on_rank, world_size, (case_list,), timeout=timeout)
    rows = []
    for case in case_list:
        want = reference(case)
        for rank, results in enumerate(per_rank):
            got = results[case]
            rows.append({"world_size": world_size, "case": case, "rank": rank, "synced": case[-1],
                         "max_abs_diff": max_abs_diff(got, want), "close": within_tolerance(got, want, case[2]),
                         "tolerances_off": tolerances_off(got, want, case[2])})
    return rows


def case_ok(rows: list[dict]) -> bool:
    """All ranks of a synced case must match. An unsynced case (N > 1) is the negative
    control: the same comparison must fail on some rank, by at least ``CONTROL_MARGIN``
    tolerances, or the check proves nothing."""
    if rows[0]["synced"] or rows[0]["world_size"] == 1:
        return all(r["close"] for r in rows)
    return max(r["tolerances_off"] for r in rows) >= CONTROL_MARGIN


ACCUM_STEPS = (2, 3)


def accum_cases(world_size: int, models=MODEL_NAMES, dtypes=DTYPE_NAMES, ks=ACCUM_STEPS) -> list[tuple]:
    """Every K for which the global batch splits into N * K equal micro-batches: the
    trainer refuses the others (``TrainConfig.check_batch_split``), as unequal pieces
    would weigh their samples unequally."""
    return [("accum", m, d, k) for m in models for d in dtypes for k in ks if GLOBAL_BATCH % (world_size * k) == 0]


def check_accumulation(world_size: int, case_list: list[tuple], timeout: float = 240) -> list[dict]:
    """Gradient accumulation on ``world_size`` ranks; one row per (case, rank).

    ``close``: after the K-th micro-batch the rank's gradient matches one process on the
    whole global batch. ``mid_close``: after micro-batch K-1 (run under ``no_sync``) it
    matches rank 0's. For N > 1 that must be False: the control that shows the K-1
    micro-batches really skipped the all-reduce (``run_cases`` tests that the
    comparison can fail at all).
    """
    per_rank = run_on_ranks(accum_cases_on_rank, world_size, (case_list,), timeout=timeout)
    return accum_rows(per_rank, case_list)


def accum_rows(per_rank: list[dict], case_list: list[tuple]) -> list[dict]:
    """The rows of :func:`check_accumulation` from every rank's ``{case: [.grad after each
    micro-batch]}``, however the ranks were started (here, or ``accelerate launch``)."""
    world_size, rows = len(per_rank), []
    for case in case_list:
        _, model, dtype, _ = case
        want, mid0 = reference_grads(model, dtype), per_rank[0][case][-2]
        for rank, results in enumerate(per_rank):
            final, mid = results[case][-1], results[case][-2]
            rows.append({"world_size": world_size, "case": case, "rank": rank,
                         "max_abs_diff": max_abs_diff(final, want), "close": within_tolerance(final, want, dtype),
                         "mid_diff": max_abs_diff(mid, mid0), "mid_close": within_tolerance(mid, mid0, dtype),
                         "mid_tolerances_off": tolerances_off(mid, mid0, dtype)})
    return rows


def accum_ok(rows: list[dict]) -> bool:
    """Synced after the K-th micro-batch; for N > 1, apart by ``CONTROL_MARGIN`` tolerances after K-1."""
    synced_at_end = all(r["close"] for r in rows)
    return synced_at_end and (rows[0]["world_size"] == 1 or
                              max(r["mid_tolerances_off"] for r in rows) >= CONTROL_MARGIN)


def by_case(rows: list[dict]) -> dict[tuple, list[dict]]:
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    return by_case
