"""Issue 24: the check runs the user's whole training step (``ddp_demo.check.Recipe``), names the bugs
people write in it, passes the recipe people train with under ddp, zero and fsdp, and never hangs.

The verdicts come from the shared group of tests/check_group.py (one set of processes per N for
every target). Each bug in examples/check/step_bugs.py must be named alone (the other detectors stay
quiet) and miss by at least 100 tolerances (the negative controls); the right steps pass. The hangs
run as three real commands at once, and each must leave no process in its session.
"""

from __future__ import annotations

import os
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest
import torch

from ddp_demo.check.diagnose_step import gradient_ratio
from ddp_demo.check.report import text
from ddp_demo.check.stalled import culprit, one_line, others_wait
from ddp_demo.core.spawn import WorkerError, run_on_ranks
from ddp_demo.core.tolerances import BF16_CONTROL_MARGIN, CONTROL_MARGIN

from .check_group import EX, STEP_FAILING, STEP_PASSING, verdicts
from .helpers import PYTHON, ROOT, clean_env, kill_session


@pytest.mark.parametrize("name", STEP_PASSING)
def test_right_steps_pass_within_float64_rounding(name):
    v = verdicts()[name]
    assert v.ok and v.causes == [], text(v)
    assert max(r.max_abs_diff for w in v.worlds for r in w.rows) < 1e-14, text(v)


@pytest.mark.parametrize("name", STEP_FAILING)
def test_each_step_bug_is_named_alone_and_misses_by_far(name):
    v = verdicts()[name]
    assert [c.key for c in v.causes] == [STEP_FAILING[name]], text(v)
    worst = max((r for r in v.worlds[0].rows if not r.ok), key=lambda r: r.max_abs_diff / r.tolerance)
    assert worst.max_abs_diff >= CONTROL_MARGIN * worst.tolerance, text(v)


def test_the_ratios_are_found_in_what_happened():
    assert "is 2 x one process's" in verdicts()["step_bugs.py:undivided"].causes[0].title  # K = 2
    assert "(2 at N=2, 3 at N=3)" in verdicts()["step_bugs.py:lr_scaled"].causes[0].title
    for gen in ("torch", "numpy", "random"):
        assert verdicts()[f"step_bugs.py:rank_seeded_{gen}"].causes[0].names == [gen]
    assert verdicts()["step_bugs.py:decay_local"].causes[0].names == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert "clip_grad_norm_ on local gradients" in verdicts()["step_bugs.py:clip_local"].causes[0].title


def test_the_ratio_pairs_each_gradient_with_its_own_tolerance_when_a_parameter_has_none():
    """A parameter the loss never reached has no gradient: each tensor is still checked against its own
    row's tolerance (a zip over the names once paired ``b`` with ``unused``'s)."""
    g = {"a": torch.ones(3), "unused": None, "b": torch.full((2,), 5.0)}
    rows = [SimpleNamespace(name=n, stage="gradient", tolerance=1e-9) for n in ("a", "b")]
    reference = SimpleNamespace(reference=SimpleNamespace(grads=g))
    doubled = SimpleNamespace(ranks=[{"grads": {"a": 2 * g["a"], "b": 2 * g["b"]}}], rows=rows)
    assert gradient_ratio(reference, doubled) == pytest.approx(2.0)
    off = SimpleNamespace(ranks=[{"grads": {"a": 2 * g["a"], "b": 3 * g["b"]}}], rows=rows)  # no one ratio fits
    assert gradient_ratio(reference, off) is None


def test_the_recipe_is_what_ran():
    """The schedule (warm-up, then cosine), two micro-batches per step (the first in no_sync),
    clipping after the averaging backward: read from the reference and the ranks' traces."""
    v = verdicts()["recipe.py:build_float64"]
    assert [round(lr / 3e-3, 6) for lr in v.reference.lrs] == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]
    for w in v.worlds:
        for rank in w.ranks:
            assert [s["forwards"] for s in rank["trace"]] == [[[True, False], [True, True]]] * 6
            assert [s["clips"] for s in rank["trace"]] == [[False]] * 6
            assert [s["lr"] for s in rank["trace"]] == v.reference.lrs


@pytest.mark.parametrize("strategy", ["ddp", "zero", "fsdp"])
def test_the_bf16_recipe_passes_under_each_strategy(strategy):
    """AdamW + decay, cosine with warm-up, clip_grad_norm_, accumulation with no_sync, bf16 autocast."""
    v = verdicts()[f"bf16_{strategy}"]
    assert v.ok and v.tolerance["dtype"] == "bf16_autocast", text(v)
    grads = [r.max_abs_diff for w in v.worlds for r in w.rows if r.stage == "gradient"]
    assert max(grads) > 1e-5, "no bf16 rounding shows: autocast did not run"


def test_the_bf16_control_misses_its_bound_by_far():
    v = verdicts()["bf16_control"]
    rows = [r for r in v.worlds[0].rows if r.stage == "gradient"]
    assert max(r.max_abs_diff / r.tolerance for r in rows) >= BF16_CONTROL_MARGIN, text(v)
    assert [c.key for c in v.causes] == ["last_in_no_sync"], text(v)


# --- never hang ---------------------------------------------------------------------------------


def _state(rank, last, events, raised=None, t=0.0):
    return {"rank": rank, "target": "t.py:f (ddp)", "step": 2, "last": last, "raised": raised, "time": t,
            "events": events}


def test_the_rank_named_is_the_one_to_blame():
    collective = [_state(0, "dist.all_reduce called by the step", 9), _state(1, "forward of micro-batch 1", 8)]
    assert culprit(collective)["rank"] == 0
    behind = [_state(0, "backward of micro-batch 1", 9, t=2.0), _state(1, "forward of micro-batch 1", 8, t=1.0)]
    assert one_line(behind, 20) == ("rank 1 did not finish step 2 of t.py:f (ddp) within --timeout 20 s "
                                    "(last: forward of micro-batch 1)")
    raised = [_state(0, "backward of micro-batch 1", 9, "RuntimeError: reset", 5.0),
              _state(1, "forward of micro-batch 1", 8, "ValueError: bad", 4.0)]
    assert one_line(raised) == ("rank 1 raised in step 2 of t.py:f (ddp): ValueError: bad "
                                "(last: forward of micro-batch 1)")
    # rank 0's collective gave up on rank 1 (gloo's time-out can come before the check's deadline):
    # rank 1, which never came, is the one to name
    waited = [_state(0, "backward of micro-batch 1", 9, "RuntimeError: [gloo] Timed out waiting 25000ms for recv", 5.0),
              _state(1, "forward of micro-batch 1", 8, t=1.0)]
    assert culprit(waited)["rank"] == 1


def test_others_wait_only_when_a_rank_raised_alone(tmp_path):
    import json

    now = time.time()
    def write(rank, raised_in, t=now - 5, world=2):
        state = {**_state(rank, "x", 3, t=t), "world": world, "raised_in": raised_in, "world_raised": 2,
                 "raised_at": now - 5 if raised_in else None}
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(state))

    write(0, "a"), write(1, None)
    assert others_wait(str(tmp_path), 2)  # rank 1 has waited since rank 0 raised
    write(1, "a")
    assert not others_wait(str(tmp_path), 2)  # every rank raised at the same point: they go on
    write(1, None, t=now - 2.5)
    assert not others_wait(str(tmp_path), 2)  # rank 1 went on after rank 0 raised: not waiting for it
    write(1, None, world=3)
    assert not others_wait(str(tmp_path), 2)  # rank 1 sat out this world size


def _rank_1_stuck(ctx) -> int:
    if ctx.rank == 1:
        time.sleep(120)  # stuck for good, as a rank in a collective its peer never joins
    return ctx.rank


def test_giving_up_on_a_stuck_rank_ends_the_run_at_once_not_at_its_timeout():
    """What ``others_wait`` is for: once it says give up, run_on_ranks kills the stuck rank and reports,
    instead of waiting out the rest of its timeout (60 s here) for that rank to exit."""
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"ranks \[(0, )?1\] returned nothing"):  # rank 0 may not have answered yet
        run_on_ranks(_rank_1_stuck, 2, timeout=60, give_up=lambda: True)
    assert time.monotonic() - start < 20


HANGS = {"raises_on_one_rank": "rank 1 raised in step 2 of ",
         "collective_on_one_rank": "rank 0 did not finish step 2 of ",
         "never_returns": "rank 1 did not finish step 1 of "}
TIMEOUT = 15  # the never-returning rank holds the test this long; start-up (about 5 s here) fits well inside


def test_a_step_that_stops_one_rank_ends_in_one_line_exit_2_and_leaves_no_process():
    """Three real commands at once (N = 2): a rank that raises, one that calls a collective alone, one
    that never returns. Each ends within --timeout, names the rank, the step and what it did last."""
    procs = {name: subprocess.Popen([PYTHON, "-m", "ddp_demo.check", f"{EX}/hangs.py:{name}", "--world-sizes", "2",
                                     "--timeout", str(TIMEOUT)], cwd=ROOT, env=clean_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for name in HANGS}
    try:
        out = {name: p.communicate(timeout=TIMEOUT + 60) for name, p in procs.items()}
        left = {name: _left_in_session(p.pid) for name, p in procs.items()}
    finally:
        for p in procs.values():
            kill_session(p)
    for name, p in procs.items():
        stdout, stderr = out[name]
        assert p.returncode == 2 and stdout == "", (name, stdout, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("ddp_demo.check: error: at N=2: " + HANGS[name]), stderr
        assert "(last: " in stderr and left[name] == [], (name, left[name])
    assert "dist.all_reduce called by the step" in out["collective_on_one_rank"][1]
    assert "RuntimeError: the data loader of rank 1 ran out of samples" in out["raises_on_one_rank"][1]
    assert f"within --timeout {TIMEOUT} s" in out["never_returns"][1]


def _left_in_session(sid: int) -> list[str]:
    """The processes still in the command's session once it has exited, after up to 5 s: multiprocessing's
    resource tracker, a child of the command, needs a moment to see its parent go."""
    deadline = time.monotonic() + 5
    while True:
        left = []
        for q in psutil.process_iter():
            try:
                if os.getsid(q.pid) == sid:
                    left.append(" ".join(q.cmdline()[:4]))
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
