"""The benchmark runs end to end and writes well-formed results (speed is not tested here).

The full benchmark takes minutes and does not run in CI; ``--quick`` runs every part of
it on tiny models for two repetitions, which is what this smoke test checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddp_demo.bench.command import PHASES, phases
from ddp_demo.bench.launchers import BLOCKS, block_step_times
from ddp_demo.bench.run import VARIANTS

from .helpers import PYTHON, ROOT, run_cmd


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    r = run_cmd(["bash", "launch/bench.sh", "--quick", "--no-launchers", "--device", "cpu", "--out", str(out)],
                ROOT, timeout=180, env={"PYTHON": PYTHON})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout
    return out


def positive_times(values: list[float], reps: int) -> bool:
    return len(values) == reps and all(v > 0 for v in values)


def test_results_json_holds_every_measurement(quick: Path):
    res = json.loads((quick / "results.json").read_text())
    reps = res["plan"]["reps"]["reps"]
    assert res["quick"] is True
    assert {"cpu", "cores", "torch", "backend", "device", "threads_per_rank"} <= set(res["machine"])
    assert set(res["weak_scaling"]) == {"2"}
    for per_workload in res["weak_scaling"].values():
        assert set(per_workload) == {"cnn", "mlp"}
        for m in per_workload.values():
            variants = {"bare", "DDP", "DDP tuned"}
            assert set(m["step_s"]) == variants | {f"solo {v}" for v in variants}  # solo: N = 1, rank 0 alone
            assert all(positive_times(t, reps) for t in m["step_s"].values())
            assert set(m["page_faults_per_step"]) == set(m["step_s"])
    assert [r["name"] for r in res["knobs"]["rows"]] == [v.name for v in VARIANTS]
    for row in res["knobs"]["rows"]:
        assert positive_times(row["step_s"], reps) and len(row["rss_peak_mb"]) == 2  # one per rank
    assert all(positive_times(r["time_s"], reps) for r in res["busbw"])
    assert set(res["trainer"]) == {"mlp", "cnn"}
    for m in res["trainer"].values():
        assert set(m["step_s"]) == {"bare loop", "bare loop, plain DataLoader", "trainer", "trainer, own all-reduce",
                                    "trainer, bf16"}
        assert all(positive_times(t, reps) for t in m["step_s"].values())


def test_the_raw_all_reduce_equals_ddp_and_the_unsynced_control_does_not(quick: Path):
    check = json.loads((quick / "results.json").read_text())["knobs"]["check"]
    assert check["max_diff_raw_vs_ddp"] < 1e-6
    assert check["max_diff_unsynced_vs_ddp"] > 1e-4  # the check can fail: ranks hold different data


def test_scratch_ddp_is_timed_beside_torch_ddp_and_the_raw_all_reduce(quick: Path):
    res = json.loads((quick / "results.json").read_text())
    reps = res["plan"]["reps"]["reps"]
    assert set(res["scratch"]) == {"cnn", "mlp"}
    for m in res["scratch"].values():
        assert set(m["step_s"]) == {"bare", "DDP", "ScratchDDP", "raw all-reduce"}
        assert all(positive_times(t, reps) for t in m["step_s"].values())
        assert m["max_diff_vs_ddp"] == 0.0  # the wrapper timed is the one proven equal (tests/test_scratch_ddp.py)
    rows = res["summary"]["scratch"]
    assert all(r["scratch_over_ddp"]["median"] > 0 and r["raw_over_ddp"]["median"] > 0 for r in rows)
    assert "## ddp_demo's own DDP beside torch's at N = 2" in (quick / "results.md").read_text()


def test_summary_reports_every_target(quick: Path):
    summary = json.loads((quick / "results.json").read_text())["summary"]
    targets = {t["key"]: t for t in summary["targets"]}
    assert set(targets) == {"cnn_weak_scaling_efficiency_n2", "mlp_exposed_sync_ratio_stock",
                            "cnn_ddp_overhead_n1", "accelerate_over_torchrun", "mlp_trainer_over_bare_loop",
                            "cnn_trainer_over_bare_loop"}
    assert targets["accelerate_over_torchrun"]["value"] is None  # --no-launchers
    assert all(isinstance(targets[k]["met"], bool) for k in targets if k != "accelerate_over_torchrun")
    assert [r["name"] for r in summary["knobs"]] == [v.name for v in VARIANTS]


def test_markdown_and_plot_are_written(quick: Path):
    md = (quick / "results.md").read_text()
    for heading in ("## Targets", "## Weak scaling", "## Where the time goes", "## gloo all-reduce at N = 2",
                    "## DDP at N = 1", "## accelerate vs torchrun", "## The trainer's step vs the minimal DDP loop",
                    "## The whole command"):
        assert heading in md
    png = (quick / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_the_whole_command_splits_into_phases_that_add_up():
    timeline = {"main_started": 12.0, "training_started": 13.5, "training_ended": 20.0, "checks_ended": 20.25}
    split = phases(10.0, 21.0, timeline, written=20.5)
    assert list(split) == list(PHASES)
    assert split == pytest.approx({"launcher + imports": 2.0, "set-up": 1.5, "training": 6.5, "final checks": 0.25,
                                   "writing": 0.25, "exit": 0.5})


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2():
    r = run_cmd(["bash", "launch/gpu_check.sh"], ROOT, timeout=60, env={"PYTHON": PYTHON, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no CUDA GPU" in r.stderr
    assert r.stdout == ""


def test_launcher_step_times_are_cut_into_blocks_after_warm_up(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    # 64 samples per step: 2 slow warm-up steps, then steps of 10 ms and 20 ms
    rates = [64 / 1.0] * 2 + [64 / 0.010] * 5 + [64 / 0.020] * 5
    metrics.write_text("".join(json.dumps({"step": i + 1, "samples_per_s": r}) + "\n" for i, r in enumerate(rates)))
    blocks = block_step_times(metrics, warmup=2)
    assert len(blocks) == BLOCKS
    assert blocks == pytest.approx([0.010, 0.010, 0.015, 0.020, 0.020])
    with pytest.raises(ValueError):
        block_step_times(metrics, warmup=10)


def test_the_checkpoint_bench_reports_each_strategy_and_what_each_rank_writes():
    """``python -m ddp_demo.bench checkpoint --quick``'s measurement: a row per strategy and N; at N = 2
    both ranks write a share (DCP writes each tensor once, so none writes it all) and no tensor is lost."""
    from ddp_demo.bench import checkpoint_io

    rows = checkpoint_io.measure(["ddp", "zero", "fsdp"], [1, 2], 1, checkpoint_io.QUICK)
    by = {(r["strategy"], r["n"]): r for r in rows}
    assert sorted(by) == sorted((s, n) for s in ("ddp", "zero", "fsdp") for n in (1, 2))
    assert all(r["save_s"] > 0 and r["load_s"] > 0 and len(r["bytes_per_rank"]) == r["n"] for r in rows)
    for strategy in ("ddp", "zero", "fsdp"):
        (alone,), shares = by[strategy, 1]["bytes_per_rank"], by[strategy, 2]["bytes_per_rank"]
        assert all(0 < b < 0.8 * alone for b in shares) and sum(shares) >= 0.95 * alone, (strategy, alone, shares)
    lines = checkpoint_io.report(rows).splitlines()
    assert len(lines) == 2 + len(rows) and lines[2].split()[:2] == ["ddp", "1"]
