#!/usr/bin/env bash
# The README's proof picture (issue 15): one job trained by one plain process, by torchrun at
# N = 2 and N = 4, under --strategy zero and fsdp at N = 2 (issue 21), and by the negative control (N = 2, --skip-grad-sync), drawn by ddp_demo.compare.
# Extra flags go to every run, e.g. launch/proof_picture.sh --model cnn. About two minutes on 2 cores.
USAGE="[OUT=docs/proof.png] [RUNS=runs/proof] launch/proof_picture.sh [train flags]"
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=${OUT:-docs/proof.png}
runs=${RUNS:-runs/proof}
job=(--dtype float64 --steps 100 --seed 0 "$@")  # float64: agreement down to rounding, ~1e-16

"$PYTHON" -m ddp_demo.train "${job[@]}" --out "$runs/n1"
for n in 2 4; do
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=$n -m ddp_demo.train "${job[@]}" --out "$runs/n$n"
done
for strategy in zero fsdp; do
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m ddp_demo.train "${job[@]}" \
    --strategy $strategy --out "$runs/$strategy-n2"
done
# The control writes its outputs, then fails its own check (ranks differ: exit 1), as it must.
echo "launch: the control, N = 2 with --skip-grad-sync: its error and exit status 1 are expected" >&2
status=0
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m ddp_demo.train "${job[@]}" \
  --skip-grad-sync --out "$runs/nosync" || status=$?
if [ "$status" -ne 1 ]; then
  echo "launch: the --skip-grad-sync control exited $status; expected 1 (its ranks must disagree)" >&2
  exit 1
fi
exec "$PYTHON" -m ddp_demo.compare "$runs/n1" "$runs/n2" "$runs/n4" "$runs/zero-n2" "$runs/fsdp-n2" "$runs/nosync" --out "$out"
