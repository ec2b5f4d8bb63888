#!/usr/bin/env bash
# The GPU check of issue 13, for a machine with CUDA: the trainer on cuda with nccl (N = 1 and
# N = every GPU), --strategy zero and fsdp against ddp (nccl), gradients against one process and
# against the CPU, bf16 autocast parity,
# launch/accelerate_gpu.sh, and the benchmark's GPU rows; a few minutes. It writes one results
# file, $OUT/results.json [default runs/gpu_check], and exits 0 when every check passed.
# Without CUDA it says so in one line and exits 2. Not yet run on a GPU (docs/performance.md).
USAGE="[OUT=runs/gpu_check] launch/gpu_check.sh"
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  echo "gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); run it on a machine with one" >&2
  exit 2
fi
exec "$PYTHON" -m ddp_demo.bench.gpu_check --out "${OUT:-runs/gpu_check}" "$@"
