#!/usr/bin/env bash
# One machine: NPROC_PER_NODE processes [default 2]; --standalone picks a free port itself.
USAGE="[NPROC_PER_NODE=2] launch/torchrun.sh [train flags]     e.g. launch/torchrun.sh --model cnn"
set -euo pipefail
source "$(dirname "$0")/common.sh"
torchrun_train --standalone --nproc_per_node="${NPROC_PER_NODE:-2}" -m ddp_demo.train "$@"
