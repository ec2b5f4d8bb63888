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

``--scratch`` checks ddp_demo's own DDP (``parallel/ddp.py``) against torch's instead: the
same cases under both wrappers on the same ranks, overlap, and uneven inputs with and
without Join (``proof/scratch.py``, ``proof/join.py``; docs/ddp_from_scratch.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ddp_demo.core.flags import add_options, option, parse_into
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.proof import join, scratch
from ddp_demo.proof.cases import accum_cases, accum_ok, by_case, case_ok, cases, check_accumulation, run_cases


def print_accumulation(world_size: int, models) -> bool:
    ok = True
    for rows in by_case(check_accumulation(world_size, accum_cases(world_size, models))).values():
        good = accum_ok(rows)
        ok &= good
        model, dtype, k = rows[0]["case"]
        control = "" if world_size == 1 else f"; after micro-batch {k - 1} ranks differ by " \
            f"{max(r['mid_diff'] for r in rows):.3g}, {max(r['mid_tolerances_off'] for r in rows):.3g} " \
            "tolerances (control)"
        print(f"{world_size:>2}  accum    {model:<9} {dtype:<8} K={k:<3} last  "
              f"{max(r['max_abs_diff'] for r in rows):>18.3g}  {'match' if good else 'FAIL'}{control}")
    return ok


def print_scratch(world_size: int, models) -> bool:
    """ScratchDDP against torch's DDP at one N: per case, the largest difference of each check."""
    tasks = scratch.suite_tasks(world_size, models, runs=False)
    per_rank = run_on_ranks(scratch.suite_on_rank, world_size, (tasks,), timeout=600)
    by_case: dict[tuple, dict[str, list[dict]]] = {}
    for r in scratch.compare(per_rank, tasks["cases"]):
        by_case.setdefault(r["case"][:-1], {}).setdefault(r["check"], []).append(r)
    ok = True
    for case, checks in by_case.items():
        cells = []
        for check in scratch.CHECKS:
            rs = checks.get(check)
            good = rs is None or scratch.passes(check, rs)
            ok &= good
            cells.append("-" if rs is None else f"{max(r['max_abs_diff'] for r in rs):.3g}" + ("" if good else " FAIL"))
        kind, model, dtype, *optim = case
        print(f"{world_size:>2}  {kind:<7} {model:<9} {dtype:<8} {(optim or ['-'])[0]:<5}" + "".join(
            f"  {c:>16}" for c in cells))
    return ok & print_scratch_extras(world_size, per_rank)


def print_scratch_extras(world_size: int, per_rank: list[dict]) -> bool:
    ok = True
    for bucket_bytes, steps in per_rank[0].get("overlap", {}).items():
        print(f"\noverlap, N = {world_size}, the CNN with buckets of up to {bucket_bytes:,} bytes (rank 0, ms since "
              "backward() was called):")
        for step, st in enumerate(steps, start=1):
            t = scratch.timeline(st)
            ok &= scratch.overlapped(st) == (t["buckets"] > 1)  # several buckets overlap; one cannot
            print(f"  step {step}: {t['buckets']} bucket(s) launched at {', '.join(f'{x:.3f}' for x in t['launch_ms'])}"
                  f"; last gradient {t['last_gradient_ms']:.3f}; backward returned {t['backward_returned_ms']:.3f}"
                  + ("; first launch before the last gradient" if scratch.overlapped(st) else ""))
    for case in per_rank[0].get("join", {}):
        d = join.differences(per_rank, case, join.reference(case[0], case[1], world_size, case[3]))
        ok &= d["close"]
        print(f"Join, N = {world_size}, batches {join.batch_counts(world_size)}: {case[0]} {case[1]} {case[2]}, "
              f"divide_by_initial_world_size={case[3]}: max |difference| from one process: gradients "
              f"{d['grads']:.3g}, parameters {d['params']:.3g}" + ("" if d["close"] else " FAIL"))
    for rank, res in enumerate(per_rank):
        for wrapper, outcome in res.get("no_join", {}).items():
            ok &= rank == 0 or not outcome["finished"]
            print(f"no Join, {wrapper}: rank {rank} " + ("finished its batches" if outcome["finished"]
                                                         else outcome["message"]))
    return ok


def main_scratch(world_sizes: list[int], models) -> int:
    ok = True
    print(f"{'N':>2}  {'check':<7} {'model':<9} {'dtype':<8} {'optim':<5}" + "".join(
        f"  {c:>16}" for c in scratch.CHECKS) + "   (max |ScratchDDP - torch DDP|)")
    for n in world_sizes:
        ok &= print_scratch(n, models)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


@dataclass(frozen=True)
class VerifyOptions:
    world_sizes: tuple[int, ...] = option((1, 2, 3, 4), "N values to test", type_=int, nargs="+")
    models: tuple[str, ...] = option(MODEL_NAMES, "models to test", MODEL_NAMES, str, parse_choices=True, nargs="+")
    scratch: bool = option(False, "check ddp_demo's own DDP (ddp_demo/parallel/ddp.py) against torch's instead")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp_demo.verify", description=__doc__.splitlines()[0])
    args = parse_into(VerifyOptions, add_options(parser, VerifyOptions), argv)
    if args.scratch:
        return main_scratch(args.world_sizes, args.models)
    ok = True
    print(f"{'N':>2}  {'check':<8} {'model':<9} {'dtype':<8} {'optim':<5} {'sync':<4}  "
          f"{'max |DDP - single|':>18}  verdict")
    for n in args.world_sizes:
        rows = run_cases(n, cases(args.models))
        for case in dict.fromkeys(r["case"] for r in rows):
            mine = [r for r in rows if r["case"] == case]
            good = case_ok(mine)
            ok &= good
            optim, sync = case.optimizer or "-", "on" if case.synced else "off"
            off = max(r["tolerances_off"] for r in mine)
            verdict = ("match" if mine[0]["synced"] or n == 1 else f"differs by {off:.3g} tolerances (control)") \
                if good else "FAIL"
            print(f"{n:>2}  {case.kind:<8} {case.model:<9} {case.dtype:<8} {optim:<5} {sync:<4}  "
                  f"{max(r['max_abs_diff'] for r in mine):>18.3g}  {verdict}")
    for n in args.world_sizes:
        ok &= print_accumulation(n, args.models)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
