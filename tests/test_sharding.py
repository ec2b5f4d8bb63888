"""ZeRO and FSDP2 (``--strategy zero|fsdp``) on N gloo processes equal one process: each rank's
slice of the gradients after one step, of the parameters and optimizer state after 5 steps of
SGD-with-momentum and of Adam, for every model, dtype and N = 1..4, within the DDP proof's
tolerances. The MLP's 32 hidden rows split unevenly at N = 3 (11, 11, 10) and its 2 output rows
leave ranks with none at N = 3 and 4: uneven shards are part of every fsdp case.

Each world size starts its processes once and runs every case (``proof/sharded.py``). The
controls reduce nothing (each rank trains on its own gradient) and must miss by
``CONTROL_MARGIN`` tolerances. A BatchNorm model under fsdp shows buffers left per rank
(pytorch/torchtitan#670: FSDP2 never broadcasts them), named by ``buffers_differing``, and
``convert_sync_batchnorm`` under ``fully_shard`` equal to one process. The byte counts of
``holdings.held_bytes`` (what ``bench.memory`` reports) are checked exactly on a small MLP.
"""

from __future__ import annotations

import functools
import math

import pytest
from torch import nn

from ddp_demo.core.models import MODEL_NAMES, build_model
from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP
from ddp_demo.parallel.strategy import StrategyConfig, shard_units
from ddp_demo.proof.cases import DTYPE_NAMES, OPTIMIZER_NAMES, case_ok
from ddp_demo.proof.sharded import (
    ACCUM_K,
    SHARDED,
    ShardCase,
    bn_cases,
    bytes_cases,
    bytes_model,
    cases,
    run_cases,
)

from .helpers import describe_ranks

WORLD_SIZES = (1, 2, 3, 4)


@functools.cache
def results(world_size: int) -> tuple[dict, dict]:
    extra = bn_cases() if world_size > 1 else []
    return run_cases(world_size, cases() + extra + bytes_cases(), timeout=240)


def rows_of(world_size: int, case: ShardCase) -> list[dict]:
    rows = results(world_size)[0][case]
    assert len(rows) == world_size
    return rows


def assert_equal_to_one_process(rows: list[dict], dtype: str) -> None:
    assert not rows[0]["uncovered"], f"no rank held all rows of {rows[0]['uncovered']}"
    assert all(r["close"] for r in rows), f"tolerance {STEP[dtype]}: {describe_ranks(rows)}"


def assert_control_fails(rows: list[dict]) -> None:
    off = max(r["tolerances_off"] for r in rows)
    assert not all(r["close"] for r in rows), f"the unreduced run passed the check: {describe_ranks(rows)}"
    assert off >= CONTROL_MARGIN, f"the unreduced run missed by only {off:.3g} tolerances: {describe_ranks(rows)}"
    assert case_ok(rows)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gradient_shards_equal_single_process(world_size, strategy, model, dtype):
    assert_equal_to_one_process(rows_of(world_size, ShardCase("grads", strategy, model, dtype)), dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parameters_state_and_full_state_dict_after_five_steps(world_size, strategy, model, dtype, optimizer):
    """Parameters and optimizer state slice by slice, and rank 0's ``full_state_dict`` whole:
    the same keys (no prefixes) and values as one process's ``state_dict``."""
    assert_equal_to_one_process(rows_of(world_size, ShardCase("steps", strategy, model, dtype, optimizer)), dtype)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_accumulated_gradients_equal_single_process(world_size, strategy, model):
    """``Wrapped.grad_sync``: the first micro-batch's backward does not reduce, the last does."""
    assert_equal_to_one_process(rows_of(world_size, ShardCase("accum", strategy, model, k=ACCUM_K)), "float64")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_unreduced_gradients_fail(world_size, strategy, model, dtype):
    assert_control_fails(rows_of(world_size, ShardCase("grads", strategy, model, dtype, reduce=False)))


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_unreduced_training_fails(world_size, strategy, model, optimizer):
    assert_control_fails(rows_of(world_size, ShardCase("steps", strategy, model, optimizer=optimizer, reduce=False)))


@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_batchnorm_under_fsdp_drifts_per_rank_and_is_named(world_size):
    """pytorch/torchtitan#670: plain BatchNorm's running statistics differ between ranks."""
    rows = rows_of(world_size, ShardCase("bn", "fsdp", layer="plain"))
    assert all(r["differing"] == ["1.running_mean", "1.running_var"] for r in rows), rows[0]["differing"]
    assert_control_fails(rows)


@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_convert_sync_batchnorm_under_fully_shard_equals_one_process(world_size):
    rows = rows_of(world_size, ShardCase("bn", "fsdp", layer="sync"))
    assert all(r["differing"] == [] for r in rows)
    assert_equal_to_one_process(rows, "float64")


def expected_bytes(strategy: str, optimizer: str, world_size: int, rank: int, owned: list[str]) -> dict[str, int]:
    """From the shapes alone: float32 (4 bytes); SGD keeps a momentum buffer per parameter,
    Adam two moments and a float32 ``step``; fsdp pads parameters and gradients to
    ``ceil(rows / N)`` rows on every rank and keeps optimizer state for its own rows only."""
    shapes = {n: tuple(p.shape) for n, p in bytes_model().named_parameters()}
    slots, step = (1, 0) if optimizer == "sgd" else (2, 4)

    def size(rows: int, shape: tuple) -> int:
        return 4 * rows * math.prod(shape[1:])

    def state(rows_of_param) -> int:
        return sum(slots * size(rows_of_param(s), s) + step for n, s in shapes.items() if n in owned)

    if strategy != "fsdp":
        whole = sum(size(s[0], s) for s in shapes.values())
        return {"parameters": whole, "gradients": whole, "optimizer state": state(lambda s: s[0])}
    chunk = {s: math.ceil(s[0] / world_size) for s in shapes.values()}
    padded = sum(size(chunk[s], s) for s in shapes.values())
    mine = state(lambda s: max(0, min(chunk[s], s[0] - rank * chunk[s])))
    return {"parameters": padded, "gradients": padded, "optimizer state": mine}


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("strategy", ("ddp", *SHARDED))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_held_bytes_exact(world_size, strategy, optimizer):
    per_rank = results(world_size)[1][ShardCase("bytes", strategy, dtype="float32", optimizer=optimizer)]
    names = [n for n, _ in bytes_model().named_parameters()]
    owned = [r["owned"] for r in per_rank]
    if strategy == "zero":  # each parameter's optimizer state on exactly one rank
        assert sorted(n for o in owned for n in o) == sorted(names)
    else:
        assert all(sorted(o) == sorted(names) for o in owned)
    for rank, r in enumerate(per_rank):
        assert r["held"] == expected_bytes(strategy, optimizer, world_size, rank, owned[rank]), f"rank {rank}"


@pytest.mark.parametrize("world_size", (2, 4))
def test_fsdp_holds_about_one_nth_and_zero_shrinks_optimizer_state_only(world_size):
    held = results(world_size)[1]
    got = {s: held[ShardCase("bytes", s, dtype="float32", optimizer="adam")] for s in ("ddp", *SHARDED)}
    ddp = got["ddp"][0]["held"]
    for rank in range(world_size):
        zero, fsdp = got["zero"][rank]["held"], got["fsdp"][rank]["held"]
        assert zero["parameters"] == ddp["parameters"] and zero["gradients"] == ddp["gradients"]
        assert fsdp["parameters"] < ddp["parameters"] and fsdp["gradients"] < ddp["gradients"]
        # Padding adds under one row per parameter (rows of 10, 1, 7, 1 floats) to each of parameters,
        # gradients and Adam's two moments; every rank keeps all four float32 ``step`` counters.
        assert sum(fsdp.values()) <= sum(ddp.values()) / world_size + 4 * 4 * (10 + 1 + 7 + 1) + 4 * 4
    assert sum(r["held"]["optimizer state"] for r in got["zero"]) == ddp["optimizer state"]


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("strategy", SHARDED)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_accumulation_averages_only_after_the_last_micro_batch(world_size, strategy, model):
    """The control of the accumulation case: syncing every micro-batch gives the same gradient,
    so what shows that ``grad_sync`` skipped the first one is that its gradients stayed local."""
    rows = rows_of(world_size, ShardCase("accum", strategy, model, k=ACCUM_K))
    assert all(r["reduced"] == [False] * (ACCUM_K - 1) + [True] for r in rows), [r["reduced"] for r in rows]


class Tied(nn.Module):
    """A toy language model: blocks in a ModuleList, the output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def test_fsdp_shards_each_block_containers_opened_tied_blocks_left_to_the_root():
    mlp, cnn = build_model("mlp", (4,), 3), build_model("cnn", (1, 8, 8), 2)
    assert shard_units(mlp) == [mlp.linear1, mlp.linear2]
    assert shard_units(cnn) == [cnn.features, cnn.head]
    assert shard_units(build_model("multiply", (1,), 0)) == []
    tied = Tied()
    assert shard_units(tied) == [*tied.layers, tied.norm]


def test_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown strategy 'zero3'; choose one of ddp, zero, fsdp"):
        StrategyConfig("zero3")
