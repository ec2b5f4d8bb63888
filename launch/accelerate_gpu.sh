#!/usr/bin/env bash
# The accelerate path on this machine's CUDA GPUs: NPROC processes [default: every GPU], nccl.
USAGE="[NPROC=<all GPUs>] launch/accelerate_gpu.sh [train flags]     e.g. NPROC=2 launch/accelerate_gpu.sh --model cnn"
set -euo pipefail
source "$(dirname "$0")/common.sh"
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -lt 1 ]; then
  echo "launch: no CUDA GPU is visible here; use launch/accelerate_cpu.sh" >&2
  exit 2
fi
unset ACCELERATE_USE_CPU  # left over from a CPU run it would put every worker on the CPU
# A free port, never a fixed one: bind port 0 and the kernel picks one. (Recent accelerate does
# the same for --main_process_port 0, huggingface/accelerate#3501; older versions do not.)
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
exec "$PYTHON" -m accelerate.commands.launch --config_file "$root/launch/accelerate_multi_gpu.yaml" \
  --num_processes "${NPROC:-$gpus}" --main_process_port "$port" -m ddp_demo.train_accelerate "$@"
