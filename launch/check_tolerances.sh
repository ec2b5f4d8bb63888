#!/usr/bin/env bash
# The measurement behind ddp_demo.check's tolerances (docs/check.md, issue 10): the check on deep
# models (a transformer, an LSTM, a CNN with SyncBatchNorm) in float64 and in their own float32,
# with SGD and with Adam, at N = 2, 3, 4, 5 steps. Each run prints its per-N largest differences;
# --json files land in OUT (default runs/check_tolerances). Takes a few minutes on 2 cores.
USAGE="launch/check_tolerances.sh [OUT]"
set -uo pipefail
source "$(dirname "$0")/common.sh"
out=${1:-runs/check_tolerances}
mkdir -p "$out"
status=0
for target in transformer.py:build lstm.py:build batchnorm_cnn.py:build_synced; do
  for dtype in float64 keep; do
    for optimizer in sgd adam; do
      name="${target%%.py*}-$dtype-$optimizer"
      "$PYTHON" -m ddp_demo.check "examples/check/$target" --world-sizes 2,3,4 --steps 5 \
        --dtype "$dtype" --optimizer "$optimizer" --json "$out/$name.json" || status=1
      echo
    done
  done
done
exit $status
