"""The verdict in words (what the command prints) and as data (``--json``, format in docs/check.md)."""

from __future__ import annotations

import json
import math

from ddp_demo.check.reduce_dtype import lines as reduce_lines
from ddp_demo.check.verdict import Row, Verdict, World

WHO = {"ddp": "DDP", "zero": "ZeRO (over DDP)", "fsdp": "FSDP (fully_shard)"}


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else "none on one side" if math.isinf(x) else f"{x:.3g}"


def _stage(row: Row, steps: int) -> str:
    return "gradient" if row.stage == "gradient" else f"value after {steps} step{'s' * (steps > 1)}"


def tolerance_line(v: Verdict) -> str:
    tol = v.tolerance
    line = (f"tolerance per tensor ({tol['dtype']}): max |DDP - one process| <= {tol['atol']:g} + {tol['rtol']:g} "
            "x max |one process|")
    if tol["adam_allowance"]:
        line += (f", plus {tol['adam_allowance']:.3g} for values after Adam steps (Adam can turn rounding in a "
                 "zero gradient into a step; docs/check.md)")
        if tol["adam_allowance"] >= 2 * sum(v.reference.lrs) * (1 - 1e-9):
            line += "; at this dtype that is a full step each way, so the gradients carry the proof"
    return line


def training(v: Verdict) -> str:
    """``3 steps of sgd, lr 0.05``, or what the recipe holds."""
    r, plan, steps = v.target.recipe, v.plan, v.steps
    head = f"{steps} step{'s' * (steps > 1)} of "
    if r.optimizer is None:
        head += f"{plan.optimizer}, lr {plan.learning_rate:g}"
    else:
        head += f"your optimizer ({v.reference.optimizer_name}), lr {v.reference.lrs[0]:g} at the first step"
    parts = [head, "a scheduler" if r.scheduler else "", f"clipping to norm {r.clip_grad_norm:g}" if r.clip_grad_norm
             else "", f"{r.accumulate} micro-batches per rank" if r.accumulate > 1 else "",
             "bf16 autocast" if r.autocast else "", "your step function" if r.step else ""]
    return ", ".join(p for p in parts if p)


def header(v: Verdict) -> list[str]:
    model, plan = v.target.model, v.plan
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = "float32 under bf16 autocast" if v.tolerance["dtype"] == "bf16_autocast" else v.tolerance["dtype"]
    return [
        f"ddp_demo.check {plan.spec}" + (f" --strategy {plan.strategy}" if plan.strategy != "ddp" else "")
        + (f" --reduce-dtype {plan.reduce_dtype}" if plan.reduce_dtype else ""),
        f"model {type(model).__name__}: {len(params)} parameter tensors ({sum(p.numel() for p in params):,} values); "
        f"batch of {v.target.batch_size}; {dtype}; {training(v)}",
        tolerance_line(v),
        f"{'N':>4}  {'gradients (1st step)':>24}  {'after ' + str(v.steps) + ' steps':>14}  {'time':>7}",
    ]


def world_line(w: World, steps: int) -> str:
    if w.error:
        return f"{w.world_size:>4}  {'error':>24}  {'':>14}  {_time(w):>7}  FAILED"
    worst = {s: max((r.max_abs_diff for r in w.rows if r.stage == s), default=0.0) for s in ("gradient", "after_steps")}
    verdict = "match" if w.numbers_match else "DIFFERS"
    grads, after = _num(worst["gradient"]), _num(worst["after_steps"])
    return f"{w.world_size:>4}  {grads:>24}  {after:>14}  {_time(w):>7}  {verdict}"


def _time(w: World) -> str:
    return "-" if math.isnan(w.seconds) else f"{w.seconds:.1f} s"


def table(w: World, steps: int) -> list[str]:
    """Every tensor at one world size, for a failure no detector explains."""
    lines = [f"every tensor at N={w.world_size}:", f"  {'tensor':<32} {'compared':<22} {'max diff':>16} "
             f"{'tolerance':>10}"]
    for r in w.rows:
        lines.append(f"  {r.name:<32} {_stage(r, steps):<22} {_num(r.max_abs_diff):>16} {r.tolerance:>10.3g}"
                     f"{'' if r.ok else '  DIFFERS'}")
    return lines


def verdict_lines(v: Verdict) -> list[str]:
    sizes = " and ".join(", ".join(str(w.world_size) for w in v.worlds).rsplit(", ", 1))
    if v.ok:
        worst = max((r.max_abs_diff for w in v.worlds for r in w.rows), default=0.0)
        note = "; with find_unused_parameters=True" if v.plan.find_unused_parameters else ""
        noun = "process" if sizes == "1" else "processes"
        if v.tolerance["dtype"] == "bf16_autocast":  # a derived bound, not rounding: say how much of it was used
            used = max((r.max_abs_diff / r.tolerance for w in v.worlds for r in w.rows if r.tolerance), default=0.0)
            note = f"; at most {used:.0%} of a tensor's bf16 bound{note}"
        return [f"PASS: {WHO[v.plan.strategy]} on {sizes} {noun} equals one process: every tensor within its "
                f"tolerance (largest difference {_num(worst)}{note})"]
    world, row = v.first_failure()
    if row is not None:
        lines = [f"FAIL at N={world.world_size}: {row.name}'s {_stage(row, v.steps)} differs by "
                 f"{_num(row.max_abs_diff)} (tolerance {row.tolerance:.3g})"]
    else:
        lines = [f"FAIL at N={world.world_size}: " + ("DDP did not run to the end" if world.error else
                                                      "some parameters receive no gradient")]
    for c in v.causes:
        lines.append(f"cause: {c.title}")
        lines.append(f"  why: {c.why}")
        if c.fix:
            lines.append(f"  fix: {c.fix}")
    if any(c.key == "not_recognised" for c in v.causes) and world.rows:
        lines += table(world, v.steps)
    return lines


def text(v: Verdict) -> str:
    return "\n".join([*header(v), *(world_line(w, v.steps) for w in v.worlds), *reduce_lines(v),
                      *verdict_lines(v)])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def as_json(v: Verdict) -> dict:
    first = v.first_failure()
    return {
        "target": v.plan.spec,
        "verdict": "PASS" if v.ok else "FAIL",
        "exit_code": 0 if v.ok else 1,
        "plan": {"dtype": v.plan.dtype, "optimizer": v.plan.optimizer, "lr": v.plan.learning_rate,
                 "steps": v.steps, "find_unused_parameters": v.plan.find_unused_parameters},
        "tolerance": {**v.tolerance, "rule": "max_abs_diff <= atol + rtol * max|one process| per tensor "
                      "(+ adam_allowance for stage after_steps)"},
        "world_sizes": [{
            "world_size": w.world_size, "seconds": _finite(w.seconds), "ok": w.numbers_match, "error": w.error,
            "unused_parameters": w.unused,
            "tensors": [{"name": r.name, "kind": r.kind, "stage": r.stage, "max_abs_diff": _finite(r.max_abs_diff),
                         "tolerance": r.tolerance, "ok": r.ok} for r in w.rows],
        } for w in v.worlds],
        "first_failure": None if first is None else {
            "world_size": first[0].world_size,
            **({} if first[1] is None else {"name": first[1].name, "stage": first[1].stage,
                                            "max_abs_diff": _finite(first[1].max_abs_diff),
                                            "tolerance": first[1].tolerance})},
        "causes": [{"key": c.key, "title": c.title, "names": c.names, "why": c.why, "fix": c.fix} for c in v.causes],
    }


def dumps(v: Verdict) -> str:
    return json.dumps(as_json(v), indent=2, allow_nan=False) + "\n"
