#!/usr/bin/env bash
# The docker-compose.yml entrypoint: launch/multinode.sh with a container's defaults, then,
# on node 0, rank 0's result from the shared volume (rank 0 runs on whichever node sorts first).
USAGE="RDZV_HOST=node0 NODE_RANK=<0|1..> [OUT_DIR=/runs/latest] launch/compose.sh [train flags]"
set -euo pipefail
source "$(dirname "$0")/common.sh"
require RDZV_HOST NODE_RANK
# The container's own address: with `--scale` several containers share a service name, so the
# name alone would not tell the other nodes which one this is.
export LOCAL_ADDR=${LOCAL_ADDR:-$(hostname -i | cut -d' ' -f1)}
out=${OUT_DIR:-/runs/latest}

"$(dirname "$0")/multinode.sh" --out "$out" "$@"
if [ "$NODE_RANK" = 0 ]; then
  echo "node0: the job finished; rank 0's summary ($out/summary.json):"
  cat "$out/summary.json"
fi
