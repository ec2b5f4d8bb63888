"""The explain walkthrough, its views and its negative control.

Each runs explain's ``main`` on 2 ranks forked from a warm server (tests/forked.py), all at once:
each prints what it computed, whatever the timing. The README's ``torchrun ... -m ddp_demo.explain``
runs under torchrun itself in tests/test_readme.py.
"""

from __future__ import annotations

import subprocess

import pytest

from .forked import forked_runs

FLAGS = {"plain": [], "control": ["--skip-allreduce"], "buckets": ["--buckets"], "shards": ["--shards"]}


@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    return forked_runs({name: (2, flags) for name, flags in FLAGS.items()},
                       {name: tmp_path_factory.mktemp(name) for name in FLAGS}, module="ddp_demo.explain")


def test_explain_two_ranks(explained):
    proc = explained["plain"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rank_lines = [line for line in lines if line.startswith("[rank ")]
    assert rank_lines == [
        "[rank 0] device cpu: shard [1.0, 2.0]; gradient before all-reduce 1.5, after 2.5",
        "[rank 1] device cpu: shard [3.0, 4.0]; gradient before all-reduce 3.5, after 2.5",
    ]
    assert "single process on the whole x: gradient 2.5 = mean(x)" in lines
    assert any(line.startswith("every rank's gradient equals the single-process gradient: yes") for line in lines)


def test_negative_control_without_allreduce_explain_says_no(explained):
    proc = explained["control"]
    assert proc.returncode != 0
    assert "gradient before all-reduce 1.5, after (no all-reduce) 1.5" in proc.stdout
    assert "every rank's gradient equals the single-process gradient: NO" in proc.stdout


def test_explain_buckets_shows_the_layout_and_the_order_from_real_hooks(explained):
    proc = explained["buckets"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    first = ("  bucket 0: linear1.weight (1280 B), linear1.bias (128 B), linear2.weight (256 B), linear2.bias (8 B)"
             " = 1672 B")
    rebuilt = ["  bucket 0: linear2.bias (8 B), linear2.weight (256 B) = 264 B",
               "  bucket 1: linear1.bias (128 B), linear1.weight (1280 B) = 1408 B"]
    assert first in lines and lines[lines.index(rebuilt[0]) + 1] == rebuilt[1]
    events = [line.split(" ms  ", 1)[1] for line in lines if " ms  " in line]
    ready = [e.split()[2] for e in events if e.startswith("gradient ready")]
    assert ready == ["linear2.bias", "linear2.weight", "linear1.bias", "linear1.weight"]  # backward: last layer first
    launched = [e for e in events if "all-reduce launched" in e]
    assert launched == [f"bucket {b}: all-reduce launched (async; backward goes on)" for b in (0, 1)]
    # bucket 0 went out while backward was still computing linear1's gradients: overlap
    assert events.index(launched[0]) < next(i for i, e in enumerate(events) if "linear1.bias" in e)
    assert "torch's DDP with the same bucket cap built the same buckets: yes" in lines
    assert any(line.startswith("every rank's gradients equal torch DDP's: yes") for line in lines)


def test_explain_shards_shows_each_ranks_rows_and_the_step_from_real_hooks(explained):
    proc = explained["shards"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for rank, (rows1, rows2) in enumerate([("0..15", "0..0"), ("16..31", "1..1")]):
        at = lines.index(f"[rank {rank}] shards: linear1 704 B, linear2 132 B (flat, padded)")
        assert lines[at + 1] == f"    linear1.weight: rows {rows1} of 32 (640 B)"
        assert lines[at + 3] == f"    linear2.weight: rows {rows2} of 2 (128 B)"
    events = [" ".join(line.split("whole:")[0].split()) for line in lines if "   whole: " in line]
    assert events == [
        "all-gather (forward) linear1 1408 B", "free (after forward) linear1 -", "all-gather (forward) linear2 264 B",
        "free (after forward) linear2 -", "all-gather (backward) linear2 264 B", "reduce-scatter linear2 264 B",
        "free (after backward) linear2 -", "all-gather (backward) linear1 1408 B", "reduce-scatter linear1 1408 B",
        "free (after backward) linear1 -"]
    assert any(line.startswith("every rank's gradient rows equal one process's: yes") for line in lines)


def test_negative_control_explain_shards_says_no_when_gradients_differ():
    from ddp_demo.parallel import fsdp_timeline

    report = {"rank": 0, "shards": [], "shard_bytes": {}, "events": [], "grad_diff": 0.1}
    assert fsdp_timeline.render_shards([report])[-1].startswith("\nevery rank's gradient rows equal one process's: NO")
    assert not fsdp_timeline.checks([report])["gradients equal one process"]
