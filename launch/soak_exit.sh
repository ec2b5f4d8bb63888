#!/usr/bin/env bash
# Launch a short 2-process gloo job RUNS times and count the launches that did not exit 0.
#   launch/soak_exit.sh [RUNS] [exit_probe flags]     e.g. launch/soak_exit.sh 200
#   launch/soak_exit.sh 40 --no-teardown              the same job without ddp_demo's teardown
# Prints one line per failed launch and a final "N of RUNS launches failed".
set -u
runs=${1:-200}; shift || true
python=${PYTHON:-python}
failed=0
for i in $(seq 1 "$runs"); do
  if ! out=$(timeout 120 "$python" -m torch.distributed.run --standalone --nproc_per_node=2 \
             -m ddp_demo.proof.exit_probe "$@" 2>&1); then
    failed=$((failed + 1))
    echo "launch $i failed: $(grep -m1 -E 'terminate|Error|error' <<<"$out")"
  fi
done
echo "$failed of $runs launches failed"
[ "$failed" -eq 0 ]
