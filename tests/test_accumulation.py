"""Gradient accumulation in the trainer (``--grad-accum-steps K``).

The gradient accumulated over K micro-batches on N ranks equals one process's gradient
over the whole global batch; after micro-batch K-1, run under ``DDP.no_sync``, the
ranks still disagree (the negative control: the K-1 micro-batches skipped the
all-reduce). Then a whole run: ``final.pt`` with K = 2 on 2 ranks equals K = 1 on one.
"""

from __future__ import annotations

import pytest

from ddp_demo.core.config import ConfigError, parse_config
from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import CONTROL_MARGIN, STEP, WHOLE_RUN
from ddp_demo.proof.cases import ACCUM_STEPS, DTYPE_NAMES, accum_ok
from ddp_demo.proof.equivalence import GLOBAL_BATCH, AccumCase

from .forked import forked_runs
from .helpers import accumulation_rows, describe_ranks, global_batches, load, max_diff

# N = 2 keeps the suite lean; `python -m ddp_demo.verify` also runs N = 1, 3 and 4.
WORLD_SIZES = (2,)
# the (N, K) for which the global batch splits into N * K equal micro-batches
SPLITS = [(n, k) for n in WORLD_SIZES for k in ACCUM_STEPS if GLOBAL_BATCH % (n * k) == 0]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size, k", SPLITS)
def test_accumulated_gradient_equals_single_process(world_size, k, model, dtype):
    rows = accumulation_rows(world_size)[AccumCase(model, dtype, k)]
    assert len(rows) == world_size
    assert all(r["close"] for r in rows), f"tolerance {STEP[dtype]}: {describe_ranks(rows)}"


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("world_size, k", SPLITS)
def test_negative_control_ranks_differ_before_the_last_micro_batch(world_size, k, model, dtype):
    rows = accumulation_rows(world_size)[AccumCase(model, dtype, k)]
    agree = all(r["mid_close"] for r in rows)
    assert not agree, f"ranks agree after micro-batch {k - 1}: {describe_ranks(rows, 'mid_diff')}"
    off = max(r["mid_tolerances_off"] for r in rows)
    assert off >= CONTROL_MARGIN, f"ranks differ by only {off:.3g} tolerances after micro-batch {k - 1}"
    assert accum_ok(rows)


FLAGS = ["--model", "mlp", "--dtype", "float64", "--steps", "30", "--global-batch-size", "16", "--seed", "5"]


def test_whole_run_with_accumulation_equals_single_process(tmp_path):
    """2 ranks x 2 micro-batches of 4 samples, against one process taking 16 at once (both
    forked from the warm server: tests/forked.py)."""
    single, accum = tmp_path / "single", tmp_path / "accum"
    procs = forked_runs({"single": (0, [*FLAGS, "--record-samples", "--out", single]),
                          "accum": (2, [*FLAGS, "--grad-accum-steps", "2", "--record-samples", "--out", accum])},
                         dict.fromkeys(("single", "accum"), tmp_path), timeout=240)
    assert all(proc.returncode == 0 for proc in procs.values()), procs
    assert max_diff(load(accum / "final.pt"), load(single / "final.pt")) <= WHOLE_RUN
    # the same samples, each on one rank only: not the same result from duplicated work
    assert global_batches(accum, 2, 16) == global_batches(single, 1, 16)


def test_batch_that_does_not_split_into_micro_batches_gets_one_line_naming_the_fix(tmp_path, in_process):
    proc = in_process("--grad-accum-steps", "3", "--global-batch-size", "16", "--out", tmp_path / "out")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert proc.stderr.strip() == ("ddp_demo: error: --global-batch-size 16 does not divide by the world size 1 "
                                   "times --grad-accum-steps 3; use a multiple of 3, e.g. --global-batch-size 15")


def test_the_fix_names_n_times_k():
    with pytest.raises(ConfigError, match="use a multiple of 8, e.g. --global-batch-size 56"):
        parse_config(["--grad-accum-steps", "4", "--global-batch-size", "60"]).check_batch_split(2)
    with pytest.raises(ConfigError, match=r"^--grad-accum-steps must be a positive integer \(got 0\)$"):
        parse_config(["--grad-accum-steps", "0"])
