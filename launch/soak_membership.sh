#!/usr/bin/env bash
# Membership soak: RUNS two-host jobs (network namespaces: run as root), each changing its nodes
# at a random step — node 1 leaves, joins, or leaves and is replaced at once — and each must end
# with the weights of an uninterrupted single process (float64, within 1e-10).
#   launch/soak_membership.sh [RUNS] [--seed S] [--kinds leave,join,replace]     default 10 runs, every kind
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 launch/soak_membership.sh 4 --kinds replace   torchrun's shared store
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # every node imports this checkout's ddp_demo
exec "$PYTHON" -m tests.soak_membership "$@"
