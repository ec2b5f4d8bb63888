"""ddp_demo's SyncBatchNorm on the CPU (issue 10) equals one process's BatchNorm on the whole batch.

For N = 1 to 4 (one set of 4 gloo processes; smaller N on subgroups, ``proof/sync_batchnorm.py``),
every case runs: BatchNorm1d
and BatchNorm2d, float64 and float32, shards dealt r::N and in uneven contiguous pieces (one rank
empty at N = 4), each layer inside DDP. Outputs, input gradients, weight and bias gradients and the
running statistics after two steps must match one process, float64 within 1e-12 and float32 at the
core tolerances. The negative control: plain BatchNorm under DDP, same comparison, must miss by
at least 100 times the tolerance. The rest compares the layer with torch's own outside a process group.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import ddp_demo
from ddp_demo.core.tolerances import STEP
from ddp_demo.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from ddp_demo.proof.sync_batchnorm import cases, run_all

WORLD_SIZES = (1, 2, 3, 4)


@functools.cache
def all_results() -> dict[int, dict[tuple, dict]]:
    return run_all(WORLD_SIZES, timeout=200)


def results(world_size: int) -> dict[tuple, dict]:
    return all_results()[world_size]


def _ids(world_size):
    return [(world_size, c) for c in cases(world_size) if c[0] == "sync"]


@pytest.mark.parametrize("world_size,case", [p for n in WORLD_SIZES for p in _ids(n)],
                         ids=lambda p: "-".join(map(str, p)) if isinstance(p, tuple) else str(p))
def test_sync_batchnorm_equals_one_process(world_size, case):
    got = results(world_size)[case]
    assert got["close"], f"{case} at N={world_size}: {got['worst']} differs by {got['max_abs_diff']:.3g}"


def test_float64_is_within_1e_12():
    for n in WORLD_SIZES:
        worst = max(r["max_abs_diff"] for c, r in results(n).items() if c[0] == "sync" and c[1] == "float64")
        assert worst <= 1e-12, f"N={n}: {worst:.3g}"


@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_negative_control_plain_batchnorm_under_ddp_fails(world_size):
    for case, got in results(world_size).items():
        if case[0] == "plain":
            assert not got["close"]
            assert got["max_abs_diff"] >= 100 * STEP[case[1]].atol, f"{case}: {got}"


# --- the layer itself, without a process group --------------------------------------------------


def _nested_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(36)))
    model[1].running_mean.fill_(0.5)
    model[2][1].eval()
    return model


def test_convert_keeps_parameters_statistics_and_modes():
    model = _nested_model()
    weight, running_mean, mode = model[1].weight, model[1].running_mean.clone(), model[2][1].training
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[2][1], SyncBatchNorm)
    assert converted[1].weight is weight  # an optimizer built before the conversion still holds it
    assert torch.equal(converted[1].running_mean, running_mean) and converted[2][1].training == mode
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    assert ddp_demo.convert_sync_batchnorm is convert_sync_batchnorm


def test_without_a_process_group_it_is_torch_batchnorm():
    """Outside a process group (and in eval mode) the layer is torch's: same outputs, bit for bit."""
    x = torch.randn(6, 2, 5, 5)
    plain, synced = _nested_model(), convert_sync_batchnorm(_nested_model())
    for mode in (True, False):
        plain.train(mode)
        synced.train(mode)
        assert torch.equal(plain(x), synced(x))
    assert torch.equal(plain[1].running_var, synced[1].running_var)


def test_torch_syncbatchnorm_is_refused_on_cpu_so_ours_is_not_a_subclass():
    """Why SyncBatchNorm subclasses _BatchNorm: DDP rejects torch's class on a CPU module."""
    assert not issubclass(SyncBatchNorm, nn.SyncBatchNorm)
    assert issubclass(SyncBatchNorm, nn.modules.batchnorm._BatchNorm)
