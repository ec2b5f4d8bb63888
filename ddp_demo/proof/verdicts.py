"""``python -m ddp_demo.verify``'s verdict in words: a summary that stands on its own, or every row.

Each :class:`Row` is one comparison at one N under one strategy, judged by ``proof/cases.py`` (ddp)
or ``proof/sharded.py`` (zero, fsdp: each rank's shard against the same rows of one process): a
match (within the tolerance of one process) or a negative control (gradient sync or reduction
off), which must *miss* by at least ``CONTROL_MARGIN`` tolerances. The summary says what was
compared, by which tolerance, how many matched, that the controls were expected to differ and
did, and ends with PASS or FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP
from ddp_demo.proof.cases import case_ok

CONTROL = "control: sync off, expected to differ"


@dataclass(frozen=True)
class Row:
    world_size: int
    check: str  # grads, params, trainer, accum
    model: str
    dtype: str
    detail: str  # the optimizer, K= for accumulation, or -
    synced: bool
    max_abs_diff: float
    tolerances_off: float  # how many tolerances apart: a control must reach CONTROL_MARGIN
    good: bool
    strategy: str = "ddp"

    @property
    def control(self) -> bool:
        return not self.synced and self.world_size > 1

    @classmethod
    def of_case(cls, n: int, case, rows: list[dict]) -> Row:
        return cls(n, case.kind, case.model, case.dtype, case.optimizer or "-", case.synced,
                   max(r["max_abs_diff"] for r in rows), max(r["tolerances_off"] for r in rows), case_ok(rows))

    @classmethod
    def of_accumulation(cls, n: int, case, rows: list[dict]) -> list[Row]:
        """After the K-th micro-batch (synced); for N > 1 also after micro-batch K-1 (under no_sync: the control)."""
        last = all(r["close"] for r in rows)
        k = f"K={case.k}"
        out = [cls(n, "accum", case.model, case.dtype, k, True, max(r["max_abs_diff"] for r in rows), 0.0, last)]
        if n > 1:
            off = max(r["mid_tolerances_off"] for r in rows)
            out.append(cls(n, "accum", case.model, case.dtype, f"{k}-1", False, max(r["mid_diff"] for r in rows),
                           off, off >= CONTROL_MARGIN))  # what accum_ok asks of the control
        return out

    @classmethod
    def of_shard(cls, n: int, case, rows: list[dict]) -> Row:
        """A case of ``proof/sharded.py``: besides the tolerance, the ranks together must hold every
        row, and an accumulated step must average only after its last micro-batch."""
        good = case_ok(rows) and not (case.synced and rows[0]["uncovered"])
        if case.kind == "accum" and n > 1:
            good &= all(r["reduced"] == [False] * (case.k - 1) + [True] for r in rows)
        detail = {"steps": case.optimizer, "accum": f"K={case.k}", "bn": case.layer}.get(case.kind, "-")
        return cls(n, case.kind, case.model or "BatchNorm", case.dtype, detail, case.synced,
                   max(r["max_abs_diff"] for r in rows), max(r["tolerances_off"] for r in rows), good, case.strategy)

    def verdict(self) -> str:
        if not self.good:
            return f"FAIL: differs by only {self.tolerances_off:.3g} tolerances ({CONTROL})" if self.control else "FAIL"
        return f"differs by {self.tolerances_off:.3g} tolerances ({CONTROL})" if self.control else "match"


def tolerance_text() -> str:
    """``tolerance per tensor: max |N processes - one| float64 <= 1e-12; float32 <= 1e-06 + 1e-05 x max |one|``"""
    parts = [f"{dtype} <= {tol.atol:g}" + (f" + {tol.rtol:g} x max |one|" if tol.rtol else "")
             for dtype, tol in STEP.items()]
    return "tolerance per tensor: max |N processes - one| " + "; ".join(parts)


def table(rows: list[Row]) -> list[str]:
    lines = [tolerance_text(), f"rows with sync off are negative controls: they must differ by at least "
             f"{CONTROL_MARGIN} tolerances",
             f"{'N':>2}  {'strategy':<8} {'check':<8} {'model':<9} {'dtype':<8} {'optim':<5} {'sync':<4}  "
             f"{'max |it - single|':>18}  verdict"]
    for r in rows:
        lines.append(f"{r.world_size:>2}  {r.strategy:<8} {r.check:<8} {r.model:<9} {r.dtype:<8} {r.detail:<5} "
                     f"{'on' if r.synced else 'off':<4}  {r.max_abs_diff:>18.3g}  {r.verdict()}")
    return lines + [final_line(rows)]


def final_line(rows: list[Row]) -> str:
    bad = [r for r in rows if not r.good]
    sizes = ", ".join(str(n) for n in dict.fromkeys(r.world_size for r in rows))
    if not bad:
        controls = ", every control differs" if any(r.control for r in rows) else ""
        strategies = "/".join(dict.fromkeys(r.strategy for r in rows)).replace("ddp", "DDP")
        return f"PASS: {strategies} equals one process in every comparison at N = {sizes}{controls}"
    return f"FAIL: {len(bad)} of {len(rows)} comparisons at N = {sizes} did not behave (marked FAIL above)"


def summary(rows: list[Row], world_sizes, models) -> list[str]:
    """What was compared, the tolerance, the matches and the controls in a few lines (per strategy
    when there are several); failures row by row."""
    ddp, sharded = [r for r in rows if r.strategy == "ddp"], [r for r in rows if r.strategy != "ddp"]
    names = ", ".join(dict.fromkeys(r.strategy for r in rows)).replace("ddp", "DDP")
    lines = [f"{names} on N = {', '.join(map(str, world_sizes))} process(es) against one process, the same global "
             f"batch (models {', '.join(models)}; float32 and float64)"]
    if ddp:
        lines += ["  compared: gradients after one backward; parameters after 5 steps of SGD and of Adam, by hand",
                  "            and through the trainer; gradients accumulated over K micro-batches"]
    if sharded:
        lines += ["  sharded (proof/sharded.py): each rank's shard against the same rows of one process: gradients;",
                  "            parameters, optimizer state and full_state_dict after 5 SGD and 5 Adam steps; accum K=2"]
    lines.append("  " + tolerance_text())
    for strategy in dict.fromkeys(r.strategy for r in rows):
        prefix = f"{strategy}: " if sharded else ""
        lines += counts([r for r in rows if r.strategy == strategy], prefix)
    bad = [r for r in rows if not r.good]
    if bad:
        lines += ["  comparisons that failed:"] + ["    " + line for line in table(bad)[2:-1]]
    return lines + [final_line(rows) + ("" if bad else " (every row: --table)")]


def counts(rows: list[Row], prefix: str = "") -> list[str]:
    """How many matched (and the largest difference per dtype) and how many controls missed."""
    matches, controls = [r for r in rows if not r.control], [r for r in rows if r.control]
    worst = {d: max((r.max_abs_diff for r in matches if r.dtype == d), default=0.0) for d in STEP}
    lines = [f"  {prefix}matches:  {sum(r.good for r in matches)} of {len(matches)} within the tolerance "
             "(largest difference: " + ", ".join(f"{d} {v:.3g}" for d, v in worst.items()) + ")"]
    if controls:
        least = min(r.tolerances_off for r in controls)
        lines += [f"  {prefix}controls: {sum(r.good for r in controls)} of {len(controls)} differ by at least "
                  f"{CONTROL_MARGIN} tolerances, as they must (sync off:",
                  f"            expected to differ; the closest missed by {least:.3g} tolerances)"]
    return lines
