"""ddp_demo's own FSDP (ddp_demo/parallel/fsdp.py, ``ScratchFSDP``) against ``fully_shard``.

One set of gloo processes per world size runs every case under both (proof/fsdp_scratch.py),
with the same blocks, data and initial weights; each rank's rows are held against the same rows
of FSDP2's local tensors on that rank:

- gradient shards after one backward, parameter shards after 5 steps of SGD with momentum and
  of Adam: bit-identical for every built-in model, dtype and N = 1..4, uneven chunks included
  (the MLP's 32 and 2 rows and the CNN's 16 and 2 rows split unevenly at N = 3 and 4). Both
  copy the gradients into the same flat reduce-scatter input and average them the same way
  (parallel/fsdp.py, ``divide_factors``), so gloo adds the same numbers in the same order; the
  optimizers then see the same rows;
- negative controls: no reduce-scatter misses by >= 100 tolerances; no all-gather before backward
  fails with autograd's error about the freed storage (or, for multiply, whose backward never
  reads its scalar, is not needed at all);
- memory: a block holds whole parameters only between its all-gather and its free;
- whole runs of the trainer: ``--strategy fsdp --ddp scratch`` (ScratchFSDP through
  parallel/strategy.py) ends where ``--strategy fsdp`` (fully_shard) and one process end, within
  WHOLE_RUN; with ``--skip-grad-sync`` (reduce=False) it misses by >= 100 times that.
"""

from __future__ import annotations

import functools

import pytest

from ddp_demo.core.config import ConfigError, parse_config
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import CONTROL_MARGIN, WHOLE_RUN
from ddp_demo.parallel.fsdp import chunk_rows, divide_factors
from ddp_demo.proof import fsdp_scratch as proof

from .forked import forked_runs
from .helpers import load, main_in_process, max_diff

WORLD_SIZES = (1, 2, 3, 4)
DTYPES = ("float32", "float64")


@functools.cache
def results(world_size: int) -> list[dict]:
    return run_on_ranks(proof.suite_on_rank, world_size, (proof.suite_tasks(world_size),), timeout=240)


@functools.cache
def rows(world_size: int) -> dict[tuple, dict]:
    return {r["case"]: r for r in proof.compare_all(results(world_size), proof.suite_tasks(world_size)["cases"])}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_equal_to_fully_shard_bit_for_bit(world_size, model, dtype):
    got = {kind: rows(world_size)[(kind, model, dtype, "scratch")] for kind in proof.KINDS}
    assert all(proof.passes(r) and r["identical"] for r in got.values()), got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_without_reduce_scatter_misses(world_size, model, dtype):
    got = [r for c, r in rows(world_size).items() if c[1:] == (model, dtype, "no reduce-scatter")]
    assert len(got) == (1 if dtype == "float32" else 3)
    assert all(proof.passes(r) and r["tolerances_off"] >= CONTROL_MARGIN for r in got), got


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_without_backward_all_gather_fails_on_freed_storage(world_size, model):
    for dtype in DTYPES:
        r = rows(world_size)[("grads", model, dtype, "no backward all-gather")]
        if model in proof.BACKWARD_READS_NO_WEIGHTS:  # nothing to gather: the gradient is still right
            assert "errors" not in r and r["identical"], r
        else:
            assert r["errors"] == [r["errors"][0]] * world_size and proof.FREED in r["errors"][0], r
        assert proof.passes(r)


def test_chunks_follow_fsdp2_rule_and_tile_the_rows():
    """torch.chunk's rule: 5 rows at N = 4 give chunks of 2, 2, 1 and none."""
    assert [chunk_rows(5, 4, r) for r in range(4)] == [(2, 0, 2), (2, 2, 2), (2, 4, 1), (2, 5, 0)]
    assert all(r["covered"] for n in WORLD_SIZES for r in rows(n).values() if "covered" in r)


def test_divide_factors_are_fsdp2s():
    """float64 divides by a power of two near sqrt(N) before the sum, the rest after."""
    assert [divide_factors(n, __import__("torch").float64)[:2] for n in (1, 2, 3, 4)] == \
        [(1, 1), (2, 1), (2, 1.5), (2, 2)]


# ---- memory ----------------------------------------------------------------------------------


def test_outside_its_forward_and_backward_a_block_holds_only_its_shard():
    for rank, res in enumerate(results(2)):
        record = res["memory"][("cnn", True)]
        assert proof.only_shards_outside(record) == [], rank
        assert sum(record["shard_bytes"].values()) * 2 >= sum(record["whole_bytes"].values())
        assert proof.sequence(record) == [
            ("all-gather (forward)", "features"), ("free (after forward)", "features"),
            ("all-gather (forward)", "head"), ("free (after forward)", "head"),
            ("all-gather (backward)", "head"), ("reduce-scatter", "head"), ("free (after backward)", "head"),
            ("all-gather (backward)", "features"), ("reduce-scatter", "features"),
            ("free (after backward)", "features")]


def test_negative_control_keeping_blocks_whole_after_forward_breaks_the_rule():
    broken = proof.only_shards_outside(results(2)[0]["memory"][("cnn", False)])
    assert any("after all-gather (forward) of head: features holds" in b for b in broken), broken


# ---- whole runs of the trainer ---------------------------------------------------------------

RUN = ("--model", "mlp", "--dtype", "float64", "--steps", "20")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """``final.pt`` of each run: the three 2-rank runs at once, forked (tests/forked.py), then the
    one process in this process (no process group: milliseconds, not a launch)."""
    d = tmp_path_factory.mktemp("fsdp_runs")
    fsdp = ("--strategy", "fsdp", *RUN)
    procs = forked_runs({
        "scratch": (2, [*fsdp, "--ddp", "scratch", "--out", "scratch"]),
        "torch": (2, [*fsdp, "--out", "torch"]),
        "control": (2, [*fsdp, "--ddp", "scratch", "--skip-grad-sync", "--out", "control"]),
    }, dict.fromkeys(("scratch", "torch", "control"), d), timeout=240)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert main_in_process([*RUN, "--out", d / "one"], monkeypatch) == 0
    said = {name: proc.stdout for name, proc in procs.items()}
    return {name: load(d / name / "final.pt") for name in (*procs, "one")} | {"said": said}


def test_trainer_scratch_fsdp_equals_fully_shard_and_one_process(trained):
    """--ddp scratch under --strategy fsdp trains with ScratchFSDP: the same weights as fully_shard
    (measured: 0, the same reduction order) and as one process (1.1e-16), float64, N = 2. Being
    bit-identical, the weights cannot tell which ran: the trainer's first line, read from the
    wrapped model, does."""
    assert "sharded by ddp_demo's ScratchFSDP" in trained["said"]["scratch"], trained["said"]["scratch"]
    assert "sharded by fully_shard" in trained["said"]["torch"], trained["said"]["torch"]
    against = {ref: max_diff(trained["scratch"], trained[ref]) for ref in ("torch", "one")}
    print(f"max |scratch - ref|: {against}")
    assert all(diff <= WHOLE_RUN for diff in against.values()), against
    assert max_diff(trained["one"], trained["control"]) >= CONTROL_MARGIN * WHOLE_RUN  # control (measured 0.12)


def test_trainer_refuses_mixed_precision_with_scratch_fsdp_in_one_line():
    """ScratchFSDP has no mixed precision policy: bf16 would silently differ from fully_shard's."""
    said = (r"^--precision bf16 with --strategy fsdp --ddp scratch: ScratchFSDP has no mixed precision "
            r"\(parallel/fsdp.py\); use --ddp torch, or drop --precision$")
    with pytest.raises(ConfigError, match=said):
        parse_config(["--strategy", "fsdp", "--ddp", "scratch", "--precision", "bf16"])
    assert parse_config(["--strategy", "fsdp", "--ddp", "scratch"]).ddp == "scratch"  # no longer refused
