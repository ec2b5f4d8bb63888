"""Prove it on your machine: DDP gradients and parameters against a single process.

    python -m ddp_demo.verify                 # world sizes 1 2 3 4, every model and dtype
    python -m ddp_demo.verify --world-sizes 2 --models mlp

For each world size N this starts N gloo processes (FileStore, no ports) and, for
every model and dtype, compares every rank's gradients after one step, and its
parameters after 5 steps of SGD-with-momentum and of Adam, with one process on the
same global batch. Each row also runs the negative control (gradient sync disabled
with ``DDP.no_sync``), which must *fail* the same comparison for N > 1.
The ``accum`` rows accumulate one step over K micro-batches (``--grad-accum-steps``): the
gradient after the K-th must match one process on the whole global batch, and after
micro-batch K-1 (under ``no_sync``) the ranks must still disagree.
Exit code 0 when every check and every control behaves.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .equivalence import GLOBAL_BATCH, accum_cases_on_rank, all_cases_on_rank, reference_grads, reference_params
from .models import MODEL_NAMES
from .spawn import run_on_ranks

# The tolerances the tests hold DDP to (README: "How equivalence is proven").
TOLERANCE = {"float64": {"atol": 1e-12, "rtol": 0.0}, "float32": {"atol": 1e-6, "rtol": 1e-5}}
DTYPE_NAMES = ("float32", "float64")
OPTIMIZER_NAMES = ("sgd", "adam")


def cases(models=MODEL_NAMES, dtypes=DTYPE_NAMES) -> list[tuple]:
    out = []
    for m in models:
        for d in dtypes:
            out += [("grads", m, d, True), ("grads", m, d, False)]
            out += [("params", m, d, o, s) for o in OPTIMIZER_NAMES for s in (True, False)]
    return out


def reference(case: tuple) -> dict[str, torch.Tensor]:
    kind, model, dtype, *rest = case
    return reference_grads(model, dtype) if kind == "grads" else reference_params(model, dtype, rest[0])


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def within_tolerance(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> bool:
    tol = TOLERANCE[dtype]
    return all(torch.allclose(got[k], want[k], **tol) for k in want)


def check_world_size(world_size: int, case_list: list[tuple], timeout: float = 240) -> list[dict]:
    """Run every case on ``world_size`` ranks; one row per (case, rank)."""
    per_rank = run_on_ranks(all_cases_on_rank, world_size, (case_list,), timeout=timeout)
    rows = []
    for case in case_list:
        want = reference(case)
        for rank, results in enumerate(per_rank):
            got = results[case]
            rows.append({"world_size": world_size, "case": case, "rank": rank, "synced": case[-1],
                         "max_abs_diff": max_abs_diff(got, want), "close": within_tolerance(got, want, case[2])})
    return rows


def case_ok(rows: list[dict]) -> bool:
    """All ranks of a synced case must match. An unsynced case (N > 1) is the negative
    control: the same comparison must fail on some rank, or the check proves nothing."""
    all_close = all(r["close"] for r in rows)
    return all_close if rows[0]["synced"] or rows[0]["world_size"] == 1 else not all_close


ACCUM_STEPS = (2, 3)


def accum_cases(world_size: int, models=MODEL_NAMES, dtypes=DTYPE_NAMES, ks=ACCUM_STEPS) -> list[tuple]:
    """Every K for which the global batch splits into N * K equal micro-batches: the
    trainer refuses the others (``TrainConfig.check_world_size``), as unequal pieces
    would weigh their samples unequally."""
    return [("accum", m, d, k) for m in models for d in dtypes for k in ks if GLOBAL_BATCH % (world_size * k) == 0]


def check_accumulation(world_size: int, case_list: list[tuple], timeout: float = 240) -> list[dict]:
    """Gradient accumulation on ``world_size`` ranks; one row per (case, rank).

    ``close``: after the K-th micro-batch the rank's gradient matches one process on the
    whole global batch. ``mid_close``: after micro-batch K-1 (run under ``no_sync``) it
    matches rank 0's. For N > 1 that must be False: the control that shows the K-1
    micro-batches really skipped the all-reduce (``check_world_size`` tests that the
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
                         "mid_diff": max_abs_diff(mid, mid0), "mid_close": within_tolerance(mid, mid0, dtype)})
    return rows


def accum_ok(rows: list[dict]) -> bool:
    synced_at_end = all(r["close"] for r in rows)
    return synced_at_end and (rows[0]["world_size"] == 1 or not all(r["mid_close"] for r in rows))


def print_accumulation(world_size: int, models) -> bool:
    ok = True
    for rows in _by_case(check_accumulation(world_size, accum_cases(world_size, models))).values():
        good = accum_ok(rows)
        ok &= good
        _, model, dtype, k = rows[0]["case"]
        control = "" if world_size == 1 else f"; after micro-batch {k - 1} ranks differ by " \
            f"{max(r['mid_diff'] for r in rows):.3g} (control)"
        print(f"{world_size:>2}  accum    {model:<9} {dtype:<8} K={k:<3} last  "
              f"{max(r['max_abs_diff'] for r in rows):>18.3g}  {'match' if good else 'FAIL'}{control}")
    return ok


def _by_case(rows: list[dict]) -> dict[tuple, list[dict]]:
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    return by_case


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ddp_demo.verify", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3, 4], help="N values to test")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES, help="models to test")
    args = p.parse_args(argv)
    ok = True
    print(f"{'N':>2}  {'check':<8} {'model':<9} {'dtype':<8} {'optim':<5} {'sync':<4}  "
          f"{'max |DDP - single|':>18}  verdict")
    for n in args.world_sizes:
        rows = check_world_size(n, cases(args.models))
        for case in dict.fromkeys(r["case"] for r in rows):
            mine = [r for r in rows if r["case"] == case]
            good = case_ok(mine)
            ok &= good
            kind, model, dtype, *rest = case
            optim = rest[0] if kind == "params" else "-"
            verdict = ("match" if mine[0]["synced"] or n == 1 else "differs (control)") if good else "FAIL"
            print(f"{n:>2}  {kind:<8} {model:<9} {dtype:<8} {optim:<5} {'on' if case[-1] else 'off':<4}  "
                  f"{max(r['max_abs_diff'] for r in mine):>18.3g}  {verdict}")
    for n in args.world_sizes:
        ok &= print_accumulation(n, args.models)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
