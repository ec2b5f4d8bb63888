"""Prove it on your machine: DDP gradients and parameters against a single process.

    python -m ddp_demo.verify                 # world sizes 1 2 3 4, every model and dtype
    python -m ddp_demo.verify --world-sizes 2 --models mlp
    python -m ddp_demo.verify --strategies ddp zero fsdp   # and ZeRO and FSDP2, shard by shard

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
By default it prints a summary (the tolerance, how many comparisons match, how many controls
differ as they must, and PASS or FAIL); ``--table`` (``-v``) prints every comparison.
Exit code 0 when every check and every control behaves.

``--strategies zero fsdp`` adds the sharded proof (``proof/sharded.py``, docs/sharding.md): each
rank's shard of the gradients, parameters, optimizer state and rank 0's full state dict against
the same rows of one process, accumulation over 2 micro-batches, a BatchNorm model under fsdp
(plain: its buffers drift, a control; converted: equal), with the same tolerances and controls.

``--scratch`` checks ddp_demo's own DDP (``parallel/ddp.py``) against torch's instead: the
same cases under both wrappers on the same ranks, overlap, and uneven inputs with and
without Join (``proof/scratch.py``, ``proof/join.py``; docs/ddp_from_scratch.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ddp_demo.core.flags import add_options, names_option, numbers_option, option, parse_into
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.parallel.strategy import STRATEGIES
from ddp_demo.proof import join, scratch, sharded
from ddp_demo.proof.cases import accum_cases, by_case, cases, check_accumulation, run_cases
from ddp_demo.proof.verdicts import Row, summary, table


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
    print("PASS: ScratchDDP equals torch's DDP in every check" if ok else "FAIL: some checks above say FAIL")
    return 0 if ok else 1


@dataclass(frozen=True)
class VerifyOptions:
    world_sizes: tuple[int, ...] = numbers_option((1, 2, 3, 4), "the numbers of processes N to test, e.g. 2 3 or 2,3")
    models: tuple[str, ...] = option(MODEL_NAMES, "models to test", MODEL_NAMES, str, parse_choices=True, nargs="+")
    strategies: tuple[str, ...] = names_option(("ddp",), "ddp and/or the sharded strategies zero "
                                               "(ZeroRedundancyOptimizer) and fsdp (fully_shard), e.g. ddp zero fsdp",
                                               STRATEGIES)
    table: bool = option(False, "print every comparison, one row each, not only the summary")
    scratch: bool = option(False, "check ddp_demo's own DDP (ddp_demo/parallel/ddp.py) against torch's instead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.verify", description=__doc__.splitlines()[0],
                                     epilog="example: python -m ddp_demo.verify --world-sizes 2 --models mlp --table")
    add_options(parser, VerifyOptions)
    parser.add_argument("-v", dest="table", action="store_true", help="the same as --table")
    return parser


def collect(world_sizes: tuple[int, ...], models: tuple[str, ...], strategies=("ddp",)) -> list[Row]:
    """Every comparison at every N: DDP's cases (``proof/cases.py``), then gradient accumulation,
    then the sharded strategies' cases (``proof/sharded.py``)."""
    rows = collect_ddp(world_sizes, models) if "ddp" in strategies else []
    chosen = tuple(s for s in strategies if s != "ddp")
    for n in world_sizes if chosen else ():
        extra = sharded.bn_cases() if "fsdp" in chosen and n > 1 else []
        found, _ = sharded.run_cases(n, sharded.cases(chosen, models) + extra)
        rows += [Row.of_shard(n, case, mine) for case, mine in found.items()]
    return rows


def collect_ddp(world_sizes: tuple[int, ...], models: tuple[str, ...]) -> list[Row]:
    rows: list[Row] = []
    for n in world_sizes:
        for case, mine in by_case(run_cases(n, cases(models))).items():
            rows.append(Row.of_case(n, case, mine))
    for n in world_sizes:
        for case, mine in by_case(check_accumulation(n, accum_cases(n, models))).items():
            rows += Row.of_accumulation(n, case, mine)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_into(VerifyOptions, build_parser(), argv)
    if args.scratch:
        return main_scratch(args.world_sizes, args.models)
    rows = collect(args.world_sizes, args.models, args.strategies)
    print("\n".join(table(rows) if args.table else summary(rows, args.world_sizes, args.models)))
    return 0 if all(r.good for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
