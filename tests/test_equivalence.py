"""DDP on N gloo processes equals one process: gradients after one step, parameters
after 5 steps of SGD-with-momentum and of Adam, for every model, dtype and N.

Each world size starts its processes once (FileStore, no ports, with a timeout) and runs
every case; each case is then a separate test. The ``sync=off`` cases are the negative
controls: with ``DDP.no_sync`` the same comparison must fail, or it proves nothing.
"""

from __future__ import annotations

import functools

import pytest

from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.proof.cases import DTYPE_NAMES, OPTIMIZER_NAMES, TOLERANCE, case_ok, cases, run_cases

WORLD_SIZES = (1, 2, 3, 4)


@functools.cache
def rows_for(world_size: int) -> dict[tuple, list[dict]]:
    by_case: dict[tuple, list[dict]] = {}
    for row in run_cases(world_size, cases(), timeout=240):
        by_case.setdefault(row["case"], []).append(row)
    return by_case


def _describe(rows):
    return ", ".join(f"rank {r['rank']}: max diff {r['max_abs_diff']:.3g}" for r in rows)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gradients_equal_single_process(world_size, model, dtype):
    rows = rows_for(world_size)[("grads", model, dtype, True)]
    assert len(rows) == world_size
    assert all(r["close"] for r in rows), f"tolerance {TOLERANCE[dtype]}: {_describe(rows)}"


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parameters_after_five_steps_equal_single_process(world_size, model, dtype, optimizer):
    rows = rows_for(world_size)[("params", model, dtype, optimizer, True)]
    assert all(r["close"] for r in rows), f"tolerance {TOLERANCE[dtype]}: {_describe(rows)}"


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_unsynced_gradients_fail_the_check(world_size, model, dtype):
    rows = rows_for(world_size)[("grads", model, dtype, False)]
    assert not all(r["close"] for r in rows), f"no_sync gradients passed the check: {_describe(rows)}"
    assert case_ok(rows)


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_unsynced_training_fails_the_check(world_size, model, optimizer):
    rows = rows_for(world_size)[("params", model, "float64", optimizer, False)]
    assert not all(r["close"] for r in rows), f"no_sync training passed the check: {_describe(rows)}"
