"""Numbers as the benchmark reports them: medians with min-max, pairs per repetition, tables."""

from __future__ import annotations

import statistics


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired(a: list[float], b: list[float], op) -> dict:
    """Median (min-max) over repetitions of ``op(a_i, b_i)`` for back-to-back pairs."""
    return stats([op(x, y) for x, y in zip(a, b, strict=True)])


def ratio(t: dict, a: str, b: str) -> dict:
    """t[a] / t[b], paired per repetition."""
    return paired(t[a], t[b], lambda x, y: x / y)


def spread(o: dict, digits: int = 2) -> str:
    """A ratio as 'median [min-max]'."""
    return f"{o['median']:.{digits}f} [{o['min']:.{digits}f}–{o['max']:.{digits}f}]"


def ms(s: dict) -> str:
    """A time as 'median [min-max]' in milliseconds."""
    return f"{s['median'] * 1e3:.2f} [{s['min'] * 1e3:.2f}–{s['max'] * 1e3:.2f}]"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"
