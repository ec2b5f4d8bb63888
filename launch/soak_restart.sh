#!/usr/bin/env bash
# Elastic-restart soak: RUNS times, SIGKILL a random worker at a random step of a 2-process
# job under `torchrun --max-restarts=3`; each run must finish with a final.pt bit-identical
# to an uninterrupted run's.
#   launch/soak_restart.sh [RUNS]                       default 20
#   DDP_DEMO_SHARED_STORE=1 launch/soak_restart.sh 10   the same without the per-attempt store prefix
set -u
runs=${1:-20}
python=${PYTHON:-python}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
steps=20
flags=(--model cnn --dtype float64 --steps $steps --global-batch-size 16 --checkpoint-every 4 --timeout 30)
launch() { timeout 180 "$python" -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=3 \
             -m ddp_demo.train "${flags[@]}" "$@"; }
DDP_DEMO_SHARED_STORE= launch --out "$work/ref" >"$work/ref.log" 2>&1 || { echo "reference run failed"; exit 1; }
failed=0
for i in $(seq 1 "$runs"); do
  rank=$((RANDOM % 2)); step=$((RANDOM % (steps - 1) + 1))
  start=$(date +%s)
  launch --out "$work/o$i" --checkpoint-dir "$work/c$i" --inject-fault "kill:$rank:$step" >"$work/$i.log" 2>&1
  rc=$?
  same=$("$python" - "$work/ref/final.pt" "$work/o$i/final.pt" 2>/dev/null <<'PY'
import sys, torch
a, b = (torch.load(p, weights_only=True) for p in sys.argv[1:])
print("identical" if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else "different")
PY
)
  verdict=$([ $rc -eq 0 ] && [ "$same" = identical ] && echo ok || echo FAILED)
  [ "$verdict" = ok ] || failed=$((failed + 1))
  echo "run $i: kill rank $rank at step $step -> exit $rc, final.pt ${same:-missing}, $(( $(date +%s) - start )) s: $verdict"
done
echo "$((runs - failed)) of $runs killed runs restarted and finished bit-identical"
[ "$failed" -eq 0 ]
