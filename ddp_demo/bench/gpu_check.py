"""The GPU check of issue 13; ``launch/gpu_check.sh`` runs it on a machine with CUDA.

Not yet run on a GPU: this project's machines have none (docs/performance.md says so).
Each check records what it measured in one results file, ``--out``/results.json:

1. ``trainer``: ``torchrun -m ddp_demo.train --device cuda`` at N = 1 (nccl) and at N = the
   number of GPUs when there are more: exit 0, every rank bit-identical, device cuda, nccl.
2. ``gradients``: one step's gradients, N = 1 DDP (nccl, a group of one) against the bare
   module, bit for bit; and CUDA against the CPU in float64, within ``CUDA_VS_CPU_ATOL``.
   float64 because float32 convolutions on recent GPUs use TF32 by default (10-bit
   mantissa, ``torch.backends.cudnn.allow_tf32``), which is not the CPU's arithmetic.
3. ``bf16``: ddp_demo/proof/autocast.py's bound, every model, N = 2 (nccl on two GPUs; with
   one GPU the two ranks share it over gloo, since nccl refuses two ranks on one device).
4. ``accelerate``: ``launch/accelerate_gpu.sh`` for 20 steps.
5. ``strategies``: ``--strategy zero`` and ``fsdp`` (issue 21) against ``ddp`` on every GPU, float64:
   the same ``final.pt`` within the whole-run tolerance.
6. ``bench``: DDP at N = 1 over the bare module on an MLP big enough to keep a GPU busy
   (target <= 3%); with several GPUs, exposed sync over one raw all-reduce (target <= 0.5).

``--device cpu`` runs the same pipeline on the CPU (gloo, small sizes): a check of the
plumbing only; its numbers are not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp_demo.bench import gpu_rows
from ddp_demo.bench.launchers import ROOT
from ddp_demo.core.flags import add_options, option, parse_into
from ddp_demo.core.spawn import run_on_ranks
from ddp_demo.core.tolerances import BF16_CONTROL_MARGIN, TOLERANCES, WHOLE_RUN
from ddp_demo.proof.autocast import check_autocast

CUDA_VS_CPU_ATOL = TOLERANCES["cuda_vs_cpu"]["float64"].atol


def run(cmd: list[str], env: dict | None = None, timeout: float = 300) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return {"cmd": " ".join(cmd), "exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}


def trainer(n: int, device: str, out: Path) -> dict:
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
             "ddp_demo.train", "--device", device, "--model", "cnn", "--steps", "100", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    r |= {k: summary.get(k) for k in ("device", "backend", "world_size", "params_identical_across_ranks",
                                      "heldout_accuracy")}
    r["ok"] = r["exit"] == 0 and summary.get("params_identical_across_ranks") is True
    return r


def strategies(n: int, device: str, tmp: Path) -> dict:
    """``--strategy zero`` and ``fsdp`` (nccl on CUDA) against ``ddp``: the same float64 run, the
    same ``final.pt`` within the whole-run tolerance (on the CPU, tests/test_strategy_train.py)."""
    runs = {s: run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
                    "ddp_demo.train", "--device", device, "--strategy", s, "--dtype", "float64", "--steps", "50",
                    "--out", str(tmp / s)]) for s in ("ddp", "zero", "fsdp")}
    if any(r["exit"] for r in runs.values()):
        return {"runs": runs, "ok": False}
    final = {s: torch.load(tmp / s / "final.pt") for s in runs}
    diff = {s: max((final[s][k] - final["ddp"][k]).abs().max().item() for k in final["ddp"]) for s in ("zero", "fsdp")}
    return {"world_size": n, "max_abs_diff_vs_ddp": diff, "tolerance": WHOLE_RUN,
            "ok": all(d <= WHOLE_RUN for d in diff.values())}


def gradients(device: str) -> dict:
    per_model = run_on_ranks(gpu_rows.gradients_on_rank, 1, timeout=300, device=device)[0]
    ok = all(m["ddp_vs_bare"] == 0 and m["device_vs_cpu_float64"] <= CUDA_VS_CPU_ATOL for m in per_model.values())
    return {"per_model": per_model, "atol_device_vs_cpu_float64": CUDA_VS_CPU_ATOL, "ok": ok}


def bf16(device: str, gpus: int) -> dict:
    backend = "auto" if gpus >= 2 or device == "cpu" else "gloo"
    v = check_autocast(world_size=2, device=device, backend=backend, timeout=300)
    ok = all(m["ddp_over_bound"] <= 1 and m["control_over_bound"] >= BF16_CONTROL_MARGIN for m in v.values())
    return {"backend": backend, "per_model": v, "ok": ok}


def accelerate(device: str, gpus: int, out: Path) -> dict:
    script = "accelerate_gpu.sh" if device == "cuda" else "accelerate_cpu.sh"
    r = run(["bash", str(ROOT / "launch" / script), "--steps", "20", "--out", str(out)],
            env={"PYTHON": sys.executable, "NPROC": str(max(1, gpus) if device == "cuda" else 2)})
    return r | {"ok": r["exit"] == 0}


def checks(device: str, gpus: int, tmp: Path) -> dict:
    """Every check in turn; a failing one is recorded, not fatal, so the file says what passed."""
    results: dict = {"trainer_n1": lambda: trainer(1, device, tmp / "n1")}
    if gpus > 1:
        results["trainer_all_gpus"] = lambda: trainer(gpus, device, tmp / "all")
    results["strategies"] = lambda: strategies(max(1, gpus) if device == "cuda" else 2, device, tmp / "strategies")
    results |= {"gradients": lambda: gradients(device), "bf16": lambda: bf16(device, gpus),
                "accelerate": lambda: accelerate(device, gpus, tmp / "accelerate"),
                "bench": lambda: gpu_rows.bench(device, gpus)}
    out = {}
    for name, check in results.items():
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            out[name] = check()
        except Exception as e:  # recorded, and the exit code says it failed
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    return out


@dataclass(frozen=True)
class GpuCheckOptions:
    out: str = option("runs/gpu_check", "directory for results.json")
    device: str = option("cuda", "cpu: a dry run of the plumbing", ("cuda", "cpu"), parse_choices=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_demo.bench.gpu_check", description=__doc__.splitlines()[0])
    args = parse_into(GpuCheckOptions, add_options(parser, GpuCheckOptions), argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
              "run it on a machine with one", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    machine = {"device": args.device, "gpus": gpus, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if gpus else None, "cuda": torch.version.cuda}
    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": machine} | checks(args.device, gpus, Path(tmp))
    results["all_ok"] = all(v.get("ok") for k, v in results.items() if k != "machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"gpu_check: {'every check passed' if results['all_ok'] else 'some checks FAILED'}; "
          f"wrote {out}/results.json")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
