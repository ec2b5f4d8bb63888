#!/usr/bin/env bash
# The benchmark of issue 6: weak scaling, where the time goes, DDP's knobs, wrapper overhead.
# One plain process: it starts its own process groups (N = 1, 2, 4, joined by a FileStore, no
# ports) and the real torchrun and accelerate jobs it compares, so no launcher goes in front.
USAGE="launch/bench.sh [--out DIR] [--quick] [--no-launchers] [--device auto|cpu|cuda]"
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec "$PYTHON" -m ddp_demo.bench "$@"
