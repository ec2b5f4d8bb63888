"""The equivalence checks as data: which cases run and what passes.

``run_cases`` runs a list of cases on N processes (``core.spawn.run_on_ranks``) and
compares every rank with one process (``equivalence.reference_*``) by the one tolerance
rule of ``core/tolerances.py`` (per tensor); ``case_ok`` and ``accum_ok`` turn those rows
into verdicts, including the negative controls, which must *fail* the comparison.
``python -m ddp_demo.verify`` prints them as a table; the tests assert them case by case.
"""

from __future__ import annotations

import functools

import torch

from ddp_demo.core.config import DTYPES, OPTIMIZERS
from ddp_demo.core.dist import DistContext
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP, max_abs_diff, tolerances_off, within
from ddp_demo.proof.equivalence import (
    GLOBAL_BATCH,
    AccumCase,
    Case,
    accum_cases_on_rank,
    all_cases_on_rank,
    reference_grads,
    reference_params,
    trainer_params_on_rank,
)

DTYPE_NAMES = tuple(DTYPES)
OPTIMIZER_NAMES = OPTIMIZERS


def cases(models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[Case]:
    out = []
    for m in models:
        for d in dtypes:
            out += [Case("grads", m, d, True), Case("grads", m, d, False)]
            # 5 steps; "trainer" takes them through the trainer's own loader (shuffled), wrap and loop
            out += [Case(k, m, d, True, o) for k in ("params", "trainer") for o in OPTIMIZER_NAMES]
            # Their controls in float64 only: Adam moves a lone scalar (multiply) by about lr * sign(grad)
            # whatever the gradient's size, so unsynced it misses by ~3e-4, only ~14 float32 tolerances.
            if d == "float64":
                out += [Case(k, m, d, False, o) for k in ("params", "trainer") for o in OPTIMIZER_NAMES]
    return out


ONE_PROCESS = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


@functools.cache  # the same for every world size: computed once per case (callers only read it)
def reference(case: Case) -> dict[str, torch.Tensor]:
    """What one process computes on the whole batch (``trainer``: the trainer's own code, unwrapped)."""
    if case.kind == "grads":
        return reference_grads(case.model, case.dtype)
    if case.kind == "params":
        return reference_params(case.model, case.dtype, case.optimizer)
    return trainer_params_on_rank(ONE_PROCESS, case.model, case.dtype, case.optimizer)


def run_cases(world_size: int, case_list: list[Case], timeout: float = 240) -> list[dict]:
    """Run every case on ``world_size`` ranks; one row per (case, rank)."""
    per_rank = run_on_ranks(all_cases_on_rank, world_size, (case_list,), timeout=timeout)
    rows = []
    for case in case_list:
        want, tol = reference(case), STEP[case.dtype]
        for rank, results in enumerate(per_rank):
            got = results[case]
            rows.append({"world_size": world_size, "case": case, "rank": rank, "synced": case.synced,
                         "max_abs_diff": max_abs_diff(got, want), "close": within(got, want, tol),
                         "tolerances_off": tolerances_off(got, want, tol)})
    return rows


def case_ok(rows: list[dict]) -> bool:
    """All ranks of a synced case must match. An unsynced case (N > 1) is the negative
    control: the same comparison must fail on some rank, by at least ``CONTROL_MARGIN``
    tolerances, or the check proves nothing."""
    if rows[0]["synced"] or rows[0]["world_size"] == 1:
        return all(r["close"] for r in rows)
    return max(r["tolerances_off"] for r in rows) >= CONTROL_MARGIN


ACCUM_STEPS = (2, 3)


def accum_cases(world_size: int, models=MODEL_NAMES, dtypes=DTYPE_NAMES, ks=ACCUM_STEPS) -> list[AccumCase]:
    """Every K for which the global batch splits into N * K equal micro-batches: the
    trainer refuses the others (``TrainConfig.check_batch_split``), as unequal pieces
    would weigh their samples unequally."""
    return [AccumCase(m, d, k) for m in models for d in dtypes for k in ks if GLOBAL_BATCH % (world_size * k) == 0]


def check_accumulation(world_size: int, case_list: list[AccumCase], timeout: float = 240) -> list[dict]:
    """Gradient accumulation on ``world_size`` ranks; one row per (case, rank).

    ``close``: after the K-th micro-batch the rank's gradient matches one process on the
    whole global batch. ``mid_close``: after micro-batch K-1 (run under ``no_sync``) it
    matches rank 0's. For N > 1 that must be False: the control that shows the K-1
    micro-batches really skipped the all-reduce (``run_cases`` tests that the
    comparison can fail at all).
    """
    per_rank = run_on_ranks(accum_cases_on_rank, world_size, (case_list,), timeout=timeout)
    return accum_rows(per_rank, case_list)


def accum_rows(per_rank: list[dict], case_list: list[AccumCase]) -> list[dict]:
    """The rows of :func:`check_accumulation` from every rank's ``{case: [.grad after each
    micro-batch]}``, however the ranks were started (here, or ``accelerate launch``)."""
    world_size, rows = len(per_rank), []
    for case in case_list:
        want, mid0, tol = reference_grads(case.model, case.dtype), per_rank[0][case][-2], STEP[case.dtype]
        for rank, results in enumerate(per_rank):
            final, mid = results[case][-1], results[case][-2]
            rows.append({"world_size": world_size, "case": case, "rank": rank,
                         "max_abs_diff": max_abs_diff(final, want), "close": within(final, want, tol),
                         "mid_diff": max_abs_diff(mid, mid0), "mid_close": within(mid, mid0, tol),
                         "mid_tolerances_off": tolerances_off(mid, mid0, tol)})
    return rows


def accum_ok(rows: list[dict]) -> bool:
    """Synced after the K-th micro-batch; for N > 1, apart by ``CONTROL_MARGIN`` tolerances after K-1."""
    synced_at_end = all(r["close"] for r in rows)
    return synced_at_end and (rows[0]["world_size"] == 1 or
                              max(r["mid_tolerances_off"] for r in rows) >= CONTROL_MARGIN)


def by_case(rows: list[dict]) -> dict[Case | AccumCase, list[dict]]:
    by_case: dict = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    return by_case
