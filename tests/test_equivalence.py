"""DDP on N gloo processes equals one process: gradients after one step, parameters
after 5 steps of SGD-with-momentum and of Adam, for every model, dtype and N.

The ``trainer`` cases take those 5 steps through the trainer's own code (its loader, the
torchrun launcher's ``DDP`` wrap, ``train_loop``), so a trainer that stopped wrapping, or
split the batch wrongly, fails here too, not only torch's DDP used by hand.

Each world size starts its processes once (FileStore, no ports, with a timeout) and runs
every case; each case is then a separate test. The ``sync=off`` cases are the negative
controls: with ``DDP.no_sync`` the same comparison must fail, by at least
``CONTROL_MARGIN`` tolerances, or it proves nothing.
"""

from __future__ import annotations

import pytest

from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP
from ddp_demo.proof.cases import DTYPE_NAMES, OPTIMIZER_NAMES, case_ok
from ddp_demo.proof.equivalence import Case

from .helpers import describe_ranks, equivalence_rows

WORLD_SIZES = (1, 2, 3, 4)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gradients_equal_single_process(world_size, model, dtype):
    rows = equivalence_rows(world_size)[Case("grads", model, dtype, True)]
    assert len(rows) == world_size
    assert all(r["close"] for r in rows), f"tolerance {STEP[dtype]}: {describe_ranks(rows)}"


@pytest.mark.parametrize("kind", ["params", "trainer"])
@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parameters_after_five_steps_equal_single_process(world_size, model, dtype, optimizer, kind):
    rows = equivalence_rows(world_size)[Case(kind, model, dtype, True, optimizer)]
    assert len(rows) == world_size
    assert all(r["close"] for r in rows), f"tolerance {STEP[dtype]}: {describe_ranks(rows)}"


def _assert_control_fails(rows):
    off = max(r["tolerances_off"] for r in rows)
    assert not all(r["close"] for r in rows), f"the unsynced run passed the check: {describe_ranks(rows)}"
    assert off >= CONTROL_MARGIN, f"the unsynced run missed by only {off:.3g} tolerances: {describe_ranks(rows)}"
    assert case_ok(rows)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_unsynced_gradients_fail_the_check(world_size, model, dtype):
    _assert_control_fails(equivalence_rows(world_size)[Case("grads", model, dtype, False)])


@pytest.mark.parametrize("kind", ["params", "trainer"])
@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_unsynced_training_fails_the_check(world_size, model, optimizer, kind):
    _assert_control_fails(equivalence_rows(world_size)[Case(kind, model, "float64", False, optimizer)])
