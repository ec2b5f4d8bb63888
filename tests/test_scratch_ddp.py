"""ddp_demo's own DDP (ddp_demo/parallel/ddp.py, ``ScratchDDP``) against torch's DistributedDataParallel.

One set of gloo processes per world size runs every case (proof/scratch.py), each case under
both wrappers on the same rank with the same data and initial weights:

- with the same bucket layout on both sides, gradients after one step and parameters after 5
  steps of SGD with momentum and of Adam are bit-identical, for every model, dtype and N = 1..4:
  both divide each gradient by N as they copy it into the bucket and give gloo the same flat
  buffers, so gloo adds the same numbers in the same order;
- with another layout (our small buckets against torch's one default bucket) gloo splits the
  sums differently over its ring: equal within the core tolerances (docs/ddp_from_scratch.md);
- negative control: ScratchDDP with its hooks removed misses by >= 100x the tolerance.

Then overlap (N = 2), uneven inputs with and without Join (proof/join.py), and whole runs of
``ddp_demo.train --ddp scratch`` (one on forked ranks, the others in the suites' process
groups) against ``--ddp torch``. ``python -m ddp_demo.verify --scratch`` prints the same checks.
"""

from __future__ import annotations

import functools
import json

import pytest

from ddp_demo import train_accelerate
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import STEP, WHOLE_RUN, max_abs_diff
from ddp_demo.proof import join, scratch
from ddp_demo.proof.cases import DTYPE_NAMES

from .forked import forked_runs
from .helpers import load, max_diff

WORLD_SIZES = (1, 2, 3, 4)
SEVERAL_BUCKETS, ONE_BUCKET = scratch.OVERLAP_BUCKET_BYTES


@functools.cache
def results(world_size: int) -> list[dict]:
    return run_on_ranks(scratch.suite_on_rank, world_size, (scratch.suite_tasks(world_size),), timeout=300)


@functools.cache
def rows(world_size: int) -> list[dict]:
    return scratch.compare(results(world_size), scratch.suite_tasks(world_size)["cases"])


def selected(world_size: int, check: str, model: str, dtype: str) -> dict[tuple, list[dict]]:
    """One check's rows for a model and dtype, by case (grads, SGD, Adam; per bucket setting)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows(world_size):
        if r["check"] == check and r["case"][1:3] == (model, dtype):
            out.setdefault(r["case"], []).append(r)
    return out


def describe(by_case: dict[tuple, list[dict]]) -> str:
    return "; ".join(f"{case}: " + ", ".join(f"{r['max_abs_diff']:.3g}" for r in rs) for case, rs in by_case.items())


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_equal_to_torch_ddp_bit_for_bit(world_size, model, dtype):
    """Default buckets, and small buckets on both sides (several per model, rebuilt)."""
    by_case = selected(world_size, "same buckets", model, dtype)
    assert len(by_case) == 3 * (1 + (model in scratch.SMALL_BUCKET_MODELS))
    assert all(scratch.passes("same buckets", rs) and len(rs) == world_size for rs in by_case.values()), \
        describe(by_case)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", scratch.SMALL_BUCKET_MODELS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_another_bucket_layout_is_equal_within_tolerance(world_size, model, dtype):
    by_case = selected(world_size, "other buckets", model, dtype)
    assert len(by_case) == 3
    assert all(scratch.passes("other buckets", rs) for rs in by_case.values()), \
        f"tolerance {STEP[dtype]}: {describe(by_case)}"


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_without_hooks_nothing_is_averaged(world_size, model, dtype):
    by_case = selected(world_size, "hooks removed", model, dtype)
    assert len(by_case) == 3  # grads, SGD, Adam: each must miss, by the margin
    assert all(scratch.passes("hooks removed", rs) for rs in by_case.values()), describe(by_case)


# ---- overlap ---------------------------------------------------------------------------------------


def test_with_several_buckets_the_first_all_reduce_starts_before_backward_finishes():
    steps = results(2)[0]["overlap"][SEVERAL_BUCKETS]
    assert steps[0]["buckets"] == 1  # before the first backward the order is unknown: one bucket (as DDP)
    for step in steps[1:]:
        t = scratch.timeline(step)
        assert t["buckets"] >= 2 and t["launch_order"] == list(range(t["buckets"])), t
        assert scratch.overlapped(step), f"first launch at {t['launch_ms'][0]:.3f} ms, last gradient at " \
                                         f"{t['last_gradient_ms']:.3f} ms: {t}"
        assert max(t["launch_ms"]) <= t["backward_returned_ms"], t


def test_negative_control_one_bucket_cannot_start_before_the_last_gradient():
    steps = results(2)[0]["overlap"][ONE_BUCKET]
    assert all(scratch.timeline(s)["buckets"] == 1 and not scratch.overlapped(s) for s in steps)


# ---- uneven inputs ---------------------------------------------------------------------------------

JOIN_N = scratch.JOIN_WORLD_SIZE


@functools.cache
def join_reference(model: str, dtype: str, divide: bool) -> dict:
    return join.reference(model, dtype, JOIN_N, divide)


@pytest.mark.parametrize("divide", [True, False], ids=["divide_by_initial_world_size", "divide_by_joined"])
@pytest.mark.parametrize("wrapper", list(join.WRAPPERS))
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_join_every_step_equals_one_process(model, dtype, wrapper, divide):
    d = join.differences(results(JOIN_N), (model, dtype, wrapper, divide), join_reference(model, dtype, divide))
    assert d["steps"] == join.batch_counts(JOIN_N)
    assert d["close"], f"tolerance {STEP[dtype]}: gradients off by {d['grads']:.3g}, parameters {d['params']:.3g}"


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_join_scratch_equals_torch_bit_for_bit(model, dtype):
    for divide in (True, False):
        for res in results(JOIN_N):
            ours, theirs = (res["join"][(model, dtype, w, divide)] for w in ("scratch", "torch"))
            assert all(max_abs_diff(a, b) == 0 for a, b in zip(ours["grads"], theirs["grads"], strict=True))
            assert max_abs_diff(ours["params"], theirs["params"]) == 0


def test_the_divisor_matters_only_on_steps_where_ranks_have_joined():
    """The statement is not vacuous: with N = 3 and 2, 3, 4 batches, steps 1-2 have every rank,
    step 3 two of them (gradient x 2/3 with the initial N), step 4 one (x 1/3)."""
    by_n, by_k = join_reference("mlp", "float64", True), join_reference("mlp", "float64", False)
    diffs = [max_abs_diff(a, b) for a, b in zip(by_n["grads"], by_k["grads"], strict=True)]
    assert diffs[:2] == [0.0, 0.0] and min(diffs[2:]) > 1e-3, diffs


@pytest.mark.parametrize("wrapper", list(join.WRAPPERS))
def test_negative_control_without_join_the_last_all_reduce_times_out(wrapper):
    short, long = (r["no_join"][wrapper] for r in results(2))
    assert short == {"finished": True}
    assert not long["finished"] and long["step"] == 2, long
    assert long["waited_s"] >= 0.9 * scratch.NO_JOIN_TIMEOUT_S and "timed out" in long["error"].lower(), long
    assert long["message"].startswith("without Join, rank 1 (which has 2 batches) waited "), long["message"]


# ---- the trainer: ddp_demo.train --ddp scratch --------------------------------------------------


def test_whole_run_at_n2_equals_torch_ddp(tmp_path):
    """The trainer's command line (its main on 2 forked ranks, tests/forked.py), against the same run
    with --ddp torch (in the N = 2 suite)."""
    proc = forked_runs({"scratch": (2, [*scratch.TRAIN_FLAGS, "--ddp", "scratch", "--out", tmp_path])},
                       {"scratch": tmp_path})["scratch"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = results(2)[0]["train"]["torch"]
    assert want["failed"] is None
    assert max_diff(load(tmp_path / "final.pt"), want["final"]) <= WHOLE_RUN
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert losses == pytest.approx(want["losses"], abs=WHOLE_RUN)


def test_whole_run_at_n4_with_accumulation_equals_torch_ddp_at_n2():
    """One combined check: N = 4, and no_sync on the first of K = 2 micro-batches."""
    got, want = results(4)[0]["train"]["scratch, K=2"], results(2)[0]["train"]["torch"]
    assert got["failed"] is None
    assert max_diff(got["final"], want["final"]) <= WHOLE_RUN
    assert got["losses"] == pytest.approx(want["losses"], abs=WHOLE_RUN)


def test_negative_control_skip_grad_sync_with_scratch_is_caught():
    got, want = results(2)[0]["train"]["unsynced"], results(2)[0]["train"]["torch"]
    assert got["failed"].startswith("ranks hold different parameters"), got["failed"]
    assert max_diff(got["final"], want["final"]) > 1e-3


def test_accelerate_launcher_refuses_scratch(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    code = train_accelerate.main(["--ddp", "scratch", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--ddp scratch is for ddp_demo.train" in err[0]
    assert not (tmp_path / "out").exists()
