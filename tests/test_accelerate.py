"""ddp_demo under ``accelerate launch`` on the CPU: real launcher subprocesses, with timeouts.

Each launch costs seconds, so each runs once per module, all at once (one fixture), and
several tests read its results: the equivalence checks inside ``accelerate launch``
(``ddp_demo.proof.accelerate_checks``), whole training runs against the torchrun path, and
the refusal to run unsynchronised copies.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from ddp_demo.core.models import MODEL_NAMES
from ddp_demo.core.tolerances import STEP, WHOLE_RUN, max_abs_diff, within
from ddp_demo.proof.cases import DTYPE_NAMES, accum_cases, accum_ok, accum_rows
from ddp_demo.proof.equivalence import reference_grads

from .forked import ForkedRuns
from .helpers import PYTHON, ROOT, Command, run_at_once, run_cmd

FLAGS = ["--model", "mlp", "--dtype", "float64", "--steps", "30", "--global-batch-size", "16", "--seed", "5"]


def accelerate_cpu(*flags: str, cwd: Path, entry: str = "ddp_demo.train_accelerate") -> Command:
    """``NPROC=2 launch/accelerate_cpu.sh flags``, as the README says to run it."""
    env = {"NPROC": "2", "ENTRY": entry, "PYTHON": PYTHON}
    return Command(["bash", str(ROOT / "launch" / "accelerate_cpu.sh"), *flags], cwd, env)


def load_results(path: Path) -> dict:
    """A rank's results file (tuple keys: not weights_only)."""
    return torch.load(path, weights_only=False)


def unsynchronised(cwd: Path) -> Command:
    """The CPU pitfall: the multi-process launcher without ACCELERATE_USE_CPU=1 (see
    test_refuses_unsynchronised_copies)."""
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate_cpu.yaml"),
           "--num_processes", "2", "--main_process_port", "0", "-m", "ddp_demo.train_accelerate", "--out",
           str(cwd / "out")]
    return Command(cmd, cwd, {"ACCELERATE_USE_CPU": "false"})


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every launch of this file, started at once (run_at_once; none depends on timing): the
    checks, the same job through torchrun and through accelerate with and without accumulation,
    and the unsynchronised launch. ``{name: (directory, process)}``."""
    d = {name: tmp_path_factory.mktemp(name) for name in ("checks", "torchrun", "accelerate", "accelerate_k2",
                                                          "unsynchronised")}
    # the torchrun job's ranks fork from a warm server (tests/forked.py): the reference, not what is tested
    torchrun = ForkedRuns({"torchrun": (2, [*FLAGS, "--out", d["torchrun"]])}, d)
    try:
        procs = run_at_once({
            "checks": accelerate_cpu("--out", str(d["checks"]), cwd=d["checks"],
                                     entry="ddp_demo.proof.accelerate_checks"),
            "accelerate": accelerate_cpu(*FLAGS, "--out", str(d["accelerate"]), cwd=d["accelerate"]),
            "accelerate_k2": accelerate_cpu(*FLAGS, "--grad-accum-steps", "2", "--out", str(d["accelerate_k2"]),
                                            cwd=d["accelerate_k2"]),
            "unsynchronised": unsynchronised(d["unsynchronised"]),
        })
    finally:
        reference = torchrun.wait()
    procs |= reference
    return {name: (d[name], procs[name]) for name in d}


@pytest.fixture(scope="module")
def checks(launches) -> list[dict]:
    """Every rank's results of ``ddp_demo.proof.accelerate_checks``."""
    d, proc = launches["checks"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_results(d / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def runs(launches) -> dict[str, Path]:
    """The same job through torchrun and through accelerate, with and without accumulation."""
    out = {name: launches[name] for name in ("torchrun", "accelerate", "accelerate_k2")}
    for _, proc in out.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: d for name, (d, _) in out.items()}


def test_two_processes_and_the_prepared_model_is_ddp(checks):
    assert [c["world_size"] for c in checks] == [2, 2]
    assert all(c["prepared_is_ddp"] and c["distributed_type"] == "MULTI_CPU" for c in checks), checks[0]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_gradients_after_one_step_equal_single_process(checks, model, dtype):
    want = reference_grads(model, dtype)
    for rank, c in enumerate(checks):
        got = c["grads"][(model, dtype)]
        assert within(got, want, STEP[dtype]), f"rank {rank}: max diff {max_abs_diff(got, want):.3g}"


def _id(case: tuple) -> str:
    return "-".join(map(str, case))


@pytest.mark.parametrize("case", accum_cases(2), ids=_id)
def test_accumulated_gradient_equals_single_process(checks, case):
    rows = accum_rows([c["accum"] for c in checks], [case])
    assert all(r["close"] for r in rows), f"tolerance {STEP[case.dtype]}: {[r['max_abs_diff'] for r in rows]}"


@pytest.mark.parametrize("case", accum_cases(2), ids=_id)
def test_negative_control_ranks_differ_before_the_last_micro_batch(checks, case):
    rows = accum_rows([c["accum"] for c in checks], [case])
    assert not all(r["mid_close"] for r in rows), f"ranks agree mid-step: {[r['mid_diff'] for r in rows]}"
    assert accum_ok(rows)


def final_diff(a: Path, b: Path) -> float:
    return max_abs_diff(load_results(a / "final.pt"), load_results(b / "final.pt"))


def test_accelerate_final_pt_equals_torchrun(runs):
    assert final_diff(runs["accelerate"], runs["torchrun"]) <= WHOLE_RUN
    torchrun_losses, accelerate_losses = ([json.loads(line)["loss"] for line in open(runs[n] / "metrics.jsonl")]
                                          for n in ("torchrun", "accelerate"))
    assert accelerate_losses == pytest.approx(torchrun_losses, abs=WHOLE_RUN)
    summary = json.loads((runs["accelerate"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_identical_across_ranks"]
    assert summary["launcher"] == "accelerate"


def test_accelerate_accumulation_whole_run_equals_torchrun(runs):
    """2 ranks x 2 micro-batches of 4 (accelerator.accumulate) against torchrun's 2 x 8."""
    assert final_diff(runs["accelerate_k2"], runs["torchrun"]) <= WHOLE_RUN


def test_refuses_unsynchronised_copies(launches):
    """The CPU pitfall: the multi-process launcher without ACCELERATE_USE_CPU=1 starts 2
    processes whose Accelerator each see one, so nothing would ever sync."""
    d, proc = launches["unsynchronised"]
    out = d / "out"
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ddp_demo: error: ")]
    assert len(ours) == 1 and "Accelerate sees only one" in ours[0] and "ACCELERATE_USE_CPU=1" in ours[0], proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # the launcher's report: a worker exited 2
    assert "ddp_demo/" not in proc.stderr  # no traceback through our code (the launcher prints its own)
    assert not out.exists()


def test_gpu_script_without_a_gpu_says_so_in_one_line(tmp_path):
    """CI has no GPU to run launch/accelerate_gpu.sh on; its guard, at least, runs everywhere."""
    proc = run_cmd(["bash", str(ROOT / "launch" / "accelerate_gpu.sh")], tmp_path, timeout=120,
                   env={"PYTHON": PYTHON, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "launch: no CUDA GPU is visible here; use launch/accelerate_cpu.sh"


def test_the_cpu_is_named_as_torchrun_names_it():
    """Issue 26: under accelerate launch the trainer printed `device cpu:0`, under torchrun `device cpu`."""
    from types import SimpleNamespace

    from ddp_demo.train_accelerate import context_of

    accelerator = SimpleNamespace(state=SimpleNamespace(backend="gloo"), device=torch.device("cpu", 0),
                                  process_index=1, local_process_index=1, num_processes=2)
    assert str(context_of(accelerator).device) == "cpu"
