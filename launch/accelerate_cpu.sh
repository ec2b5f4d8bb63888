#!/usr/bin/env bash
# The accelerate path on NPROC CPU processes [default 2], joined by gloo.
#   ENTRY=ddp_demo.proof.accelerate_checks runs the equivalence checks instead of the trainer (tests use it).
USAGE="[NPROC=2] launch/accelerate_cpu.sh [train flags]     e.g. NPROC=4 launch/accelerate_cpu.sh --model cnn"
set -euo pipefail
source "$(dirname "$0")/common.sh"
# The workers use the CPU only because of this variable; accelerate_cpu.yaml says why
# `--cpu` would not do (it starts a single process).
export ACCELERATE_USE_CPU=1
# A free port, never a fixed one: bind port 0 and the kernel picks one. (Recent accelerate does
# the same for --main_process_port 0, huggingface/accelerate#3501; older versions do not.)
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
exec "$PYTHON" -m accelerate.commands.launch --config_file "$root/launch/accelerate_cpu.yaml" \
  --num_processes "${NPROC:-2}" --main_process_port "$port" -m "${ENTRY:-ddp_demo.train_accelerate}" "$@"
