#!/usr/bin/env bash
# What a restart of the rendezvous store does to a running job whose store no node hosts
# (python -m ddp_demo.rendezvous): three hosts in network namespaces (run as root), the store
# stopped while the job trains, then started again (or left down). docs/elastic.md quotes a run.
#   launch/store_restart.sh [--pause S] [--cases restart,down]
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # every node imports this checkout's ddp_demo
exec "$PYTHON" -m tests.store_restart "$@"
