"""Prove it on your machine: DDP gradients and parameters against a single process.

    python -m ddp_demo.verify                 # world sizes 1 2 3 4, every model and dtype
    python -m ddp_demo.verify --world-sizes 2 --models mlp

For each world size N this starts N gloo processes (FileStore, no ports) and, for
every model and dtype, compares every rank's gradients after one step, and its
parameters after 5 steps of SGD-with-momentum and of Adam, with one process on the
same global batch; the ``trainer`` rows take those 5 steps through the trainer's own
loader, wrap and loop. Each row also runs the negative control (gradient sync disabled
with ``DDP.no_sync``), which must *fail* the same comparison for N > 1, by at least
100 tolerances.
The ``accum`` rows accumulate one step over K micro-batches (``--grad-accum-steps``): the
gradient after the K-th must match one process on the whole global batch, and after
micro-batch K-1 (under ``no_sync``) the ranks must still disagree.
Exit code 0 when every check and every control behaves.
"""

from __future__ import annotations

import argparse
import sys

from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.proof.cases import accum_cases, accum_ok, by_case, case_ok, cases, check_accumulation, run_cases


def print_accumulation(world_size: int, models) -> bool:
    ok = True
    for rows in by_case(check_accumulation(world_size, accum_cases(world_size, models))).values():
        good = accum_ok(rows)
        ok &= good
        _, model, dtype, k = rows[0]["case"]
        control = "" if world_size == 1 else f"; after micro-batch {k - 1} ranks differ by " \
            f"{max(r['mid_diff'] for r in rows):.3g}, {max(r['mid_tolerances_off'] for r in rows):.3g} " \
            "tolerances (control)"
        print(f"{world_size:>2}  accum    {model:<9} {dtype:<8} K={k:<3} last  "
              f"{max(r['max_abs_diff'] for r in rows):>18.3g}  {'match' if good else 'FAIL'}{control}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ddp_demo.verify", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3, 4], help="N values to test")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES, help="models to test")
    args = p.parse_args(argv)
    ok = True
    print(f"{'N':>2}  {'check':<8} {'model':<9} {'dtype':<8} {'optim':<5} {'sync':<4}  "
          f"{'max |DDP - single|':>18}  verdict")
    for n in args.world_sizes:
        rows = run_cases(n, cases(args.models))
        for case in dict.fromkeys(r["case"] for r in rows):
            mine = [r for r in rows if r["case"] == case]
            good = case_ok(mine)
            ok &= good
            kind, model, dtype, *rest = case
            optim = rest[0] if kind != "grads" else "-"
            off = max(r["tolerances_off"] for r in mine)
            verdict = ("match" if mine[0]["synced"] or n == 1 else f"differs by {off:.3g} tolerances (control)") \
                if good else "FAIL"
            print(f"{n:>2}  {kind:<8} {model:<9} {dtype:<8} {optim:<5} {'on' if case[-1] else 'off':<4}  "
                  f"{max(r['max_abs_diff'] for r in mine):>18.3g}  {verdict}")
    for n in args.world_sizes:
        ok &= print_accumulation(n, args.models)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
