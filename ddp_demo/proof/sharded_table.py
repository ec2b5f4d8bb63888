"""The sharded proof as one table: the largest difference from one process per strategy, model
and dtype over every world size, and by how many tolerances the controls missed.

    python -m ddp_demo.proof.sharded_table                  # N = 1..4, zero and fsdp (and ddp beside them)
    python -m ddp_demo.proof.sharded_table --world-sizes 2  # quicker

Each world size starts its processes once (``proof/sharded.py``); tests/test_sharding.py asserts
the same rows case by case, and ``python -m ddp_demo.verify --strategies zero fsdp`` gives each
row's verdict (this table is its summary per strategy, model and dtype, with ddp run through the
same ``wrap`` for comparison).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ddp_demo.core.flags import add_options, option, parse_into
from ddp_demo.core.tolerances import STEP
from ddp_demo.parallel.strategy import STRATEGIES
from ddp_demo.proof.sharded import bn_cases, cases, run_cases
from ddp_demo.proof.verdicts import Row


def collect(world_sizes: list[int], strategies: tuple[str, ...]) -> dict[tuple, dict]:
    """``{(strategy, model, dtype): {"diff": largest synced |Δ|, "margin": smallest control miss,
    "close": every row good}}``, each case judged as ``verify --strategies`` judges it (``Row.of_shard``)."""
    out: dict[tuple, dict] = {}
    for n in world_sizes:
        rows, _ = run_cases(n, cases(strategies) + (bn_cases() if n > 1 and "fsdp" in strategies else []))
        for case, per_rank in rows.items():
            row = Row.of_shard(n, case, per_rank)
            model = f"BatchNorm, {case.layer}" if case.kind == "bn" else case.model
            entry = out.setdefault((case.strategy, model, case.dtype), {"diff": None, "margin": None, "close": True})
            entry["close"] &= row.good
            if row.control:
                entry["margin"] = min(entry["margin"] or row.tolerances_off, row.tolerances_off)
            elif row.synced:
                entry["diff"] = max(entry["diff"] or 0.0, row.max_abs_diff)
    return out


def render(table: dict[tuple, dict], world_sizes: list[int]) -> str:
    lines = [f"N = {', '.join(map(str, world_sizes))}; gradients after 1 step, parameters and optimizer state "
             "after 5 SGD-momentum and 5 Adam steps, against one process",
             "| strategy | model | dtype | largest abs diff | tolerance (atol, rtol x the tensor's largest value) "
             "| within | control missed by |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (strategy, model, dtype), e in table.items():
        tol = STEP[dtype]
        margin = "-" if e["margin"] is None else f"{e['margin']:.2g} tolerances"
        diff, within = ("-", "-") if e["diff"] is None else (f"{e['diff']:.2g}", "yes" if e["close"] else "NO")
        tolerance = f"{tol.atol:g}, {tol.rtol:g}"
        lines.append(f"| {strategy} | {model} | {dtype} | {diff} | {tolerance} | {within} | {margin} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class TableOptions:
    world_sizes: tuple[int, ...] = option((1, 2, 3, 4), "numbers of processes N", type_=int, nargs="+")
    strategies: tuple[str, ...] = option(STRATEGIES, "strategies to prove", STRATEGIES, str, parse_choices=True,
                                         nargs="+")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.proof.sharded_table", description=__doc__.split("\n")[0])
    args = parse_into(TableOptions, add_options(parser, TableOptions), argv)
    table = collect(list(args.world_sizes), args.strategies)
    print(render(table, list(args.world_sizes)))
    return 0 if all(e["close"] for e in table.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
