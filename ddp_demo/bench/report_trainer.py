"""The report's sections on the trainer itself: its step against the minimal DDP loop, bf16,
and the whole default command split into phases under each allocator.

Same conventions as ``bench.report``: medians over repetitions with min-max, and a
comparison of two interleaved variants taken per repetition first (per launch, for whole
commands), then the median.
"""

from __future__ import annotations

from ddp_demo.bench.command import PHASES
from ddp_demo.bench.numbers import ms, paired, ratio, spread, stats, table


def trainer_rows(results: dict) -> list[dict]:
    """Per model: both steps, trainer / bare loop, the old own-all-reduce trainer / bare loop, bf16."""
    rows = []
    for model, m in (results.get("trainer") or {}).items():
        t = m["step_s"]
        rows.append({"model": model, "bare_step_s": stats(t["bare loop"]), "trainer_step_s": stats(t["trainer"]),
                     "trainer_over_bare": ratio(t, "trainer", "bare loop"),
                     "plain_loader_step_s": stats(t["bare loop, plain DataLoader"]),
                     "trainer_over_plain_loader": ratio(t, "trainer", "bare loop, plain DataLoader"),
                     "own_all_reduce_over_bare": ratio(t, "trainer, own all-reduce", "bare loop"),
                     "bf16_step_s": stats(t["trainer, bf16"]), "bf16_over_fp32": ratio(t, "trainer, bf16", "trainer")})
    return rows


def command_summary(results: dict) -> dict:
    """Per job and allocator: each phase's median [min-max] in seconds, the whole command's,
    and training time over glibc's default, paired per launch."""
    c = results.get("command")
    if not c or "skipped" in c:
        return c or {}
    out = {}
    for job, per_allocator in c["runs"].items():
        baseline = per_allocator.get("glibc default", {}).get("training")
        out[job] = {}
        for name, ph in per_allocator.items():
            total = [sum(parts) for parts in zip(*ph.values(), strict=True)]
            row = {p: stats(ph[p]) for p in PHASES} | {"total": stats(total)}
            if baseline:
                row["training_over_glibc_default"] = paired(ph["training"], baseline, lambda a, b: a / b)
            out[job][name] = row
    return out


def trainer_section(s: dict) -> str:
    def r3(o: dict) -> str:
        return spread(o, 3)

    rows = [[r["model"], ms(r["bare_step_s"]), ms(r["trainer_step_s"]), r3(r["trainer_over_bare"]),
             r3(r["own_all_reduce_over_bare"]), ms(r["plain_loader_step_s"]), r3(r["trainer_over_plain_loader"]),
             ms(r["bf16_step_s"]), r3(r["bf16_over_fp32"])] for r in s["trainer"]]
    return ("## The trainer's step vs the minimal DDP loop (N = 2)\n\nThe trainer's own jobs (global batch 64, "
            "SGD with momentum): per repetition one epoch of `train_loop` (progress bar, agreed loss, logging) and "
            "one epoch of the minimal DDP loop (zero_grad, forward, loss, backward, step) over the same data, "
            "interleaved; ratios paired per repetition. 'Own all-reduce' is the trainer agreeing on its loss with a "
            "collective of its own each step, as before issue 13; bf16 is `--precision bf16`. Both loops use the "
            "trainer's loader, which fetches a batch in one indexing op; 'plain DataLoader' is the bare loop with "
            "the loader a user would write (per-sample fetch, then `torch.stack`).\n\n"
            + table(["model", "bare loop, ms", "trainer, ms", "trainer / bare loop", "own all-reduce / bare loop",
                     "bare loop, plain DataLoader, ms", "trainer / that loop", "trainer bf16, ms", "bf16 / fp32"],
                    rows))


def command_section(s: dict) -> str:
    c = s.get("command")
    if not c:
        return "## The whole command, by phase\n\nNot run (--no-launchers).\n"
    if "skipped" in c:
        return f"## The whole command, by phase\n\nSkipped: {c['skipped']}.\n"
    parts = ["## The whole command, by phase and allocator (N = 2)\n\n`launch/torchrun.sh` with the trainer's "
             "defaults (`default`) and with `--model cnn`; seconds, medians [min–max] over launches; training "
             "time over glibc's default allocator paired per launch.\n"]
    for job, per_allocator in c.items():
        rows = [[name] + [f"{row[p]['median']:.2f}" for p in (*PHASES, "total")]
                + [f"{row['training_over_glibc_default']['median']:.3f}" if "training_over_glibc_default" in row
                   else "–"] for name, row in per_allocator.items()]
        parts.append(f"### {job}\n\n" + table(["allocator", *PHASES, "whole command", "training / glibc default"],
                                              rows))
    return "\n".join(parts)
