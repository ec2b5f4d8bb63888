"""``python -m ddp_demo.check --strategy`` and ``assert_ddp_equivalent(strategy=...)``: the user's
model trained under zero and fsdp (strategy.wrap) equals one process, and BatchNorm under fsdp is
named as buffers left per rank, with its fix. The control is the unconverted BatchNorm model,
which must fail; the converted one (``build_synced``) must pass under both strategies."""

from __future__ import annotations

from ddp_demo.check import check
from ddp_demo.check.options import CheckOptions
from ddp_demo.check.report import text
from ddp_demo.testing import assert_ddp_equivalent

BN = "examples/check/batchnorm_cnn.py:"


def test_batchnorm_under_fsdp_is_buffers_per_rank_and_conversion_fixes_it():
    plain, synced = check([BN + "build", BN + "build_synced"], CheckOptions(world_sizes=(2,), strategy="fsdp",
                                                                           timeout=240))
    assert not plain.ok and plain.causes[0].key == "buffers_per_rank", text(plain)
    assert "1.running_mean" in plain.causes[0].names and "convert_sync_batchnorm" in plain.causes[0].fix
    assert "--strategy fsdp" in text(plain)
    assert synced.ok, text(synced)


def test_assert_ddp_equivalent_under_zero():
    assert_ddp_equivalent(BN + "build_synced", world_sizes=(2,), strategy="zero", timeout=240)
