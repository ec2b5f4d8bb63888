#!/usr/bin/env bash
# One node of a multi-node job: run it on every node, in any order. Every parameter comes
# from the environment; python -m ddp_demo.doctor checks them first (DOCTOR=0 skips it).
USAGE="RDZV_HOST=<node 0's address, or the store's with RDZV_EXTERNAL=1> NODE_RANK=<0 on node 0, else 1..> \
[RDZV_EXTERNAL=0, or 1: the store runs on a host of its own] [NNODES=2, or MIN:MAX] [NPROC_PER_NODE=1] \
[RDZV_PORT=29400] [RDZV_ID=ddp_demo] [LOCAL_ADDR=<this node's address>] [GLOO_SOCKET_IFNAME=<its interface>] \
[MAX_RESTARTS=<torchrun's default, 0>] [RDZV_CONF=<key=value,... for the rendezvous>] [DOCTOR=1] \
launch/multinode.sh [train flags]"
set -euo pipefail
source "$(dirname "$0")/common.sh"
require RDZV_HOST NODE_RANK
export NNODES=${NNODES:-2} NPROC_PER_NODE=${NPROC_PER_NODE:-1} RDZV_PORT=${RDZV_PORT:-29400}
export RDZV_ID=${RDZV_ID:-ddp_demo} RDZV_EXTERNAL=${RDZV_EXTERNAL:-0}
case "$RDZV_EXTERNAL" in
  0 | 1) ;;
  *) echo "launch: RDZV_EXTERNAL=$RDZV_EXTERNAL is not 0 or 1; set RDZV_EXTERNAL=1 when" \
       "python -m ddp_demo.rendezvous runs the store on a host of its own, else leave it unset" >&2; exit 2 ;;
esac

# Node 0 hosts the rendezvous store, unless RDZV_EXTERNAL=1 says that a store no node hosts
# listens at RDZV_HOST (python -m ddp_demo.rendezvous): then every agent is its client, and
# losing node 0 is no worse than losing any other node (docs/elastic.md). Said explicitly because
# torch only guesses it by comparing RDZV_HOST with this machine's hostname and addresses
# (torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py, _create_tcp_store), a guess
# that fails for an IP on a second NIC.
is_host=$([ "$NODE_RANK" = 0 ] && [ "$RDZV_EXTERNAL" = 0 ] && echo 1 || echo 0)

# Every rendezvous round gets a fresh store for the workers, on a port the new rank 0's agent
# picks and hands out through that round's keys. With the store torchrun shares by default
# (torch 2.13) a node that joins a later round waits for that store's address, which node 0
# published only in its first round (dynamic_rendezvous.py reuses _bootstrap_store_info), and
# the only per-attempt name the workers get, TORCHELASTIC_RESTART_COUNT, is counted by each agent
# for itself (pytorch/pytorch#135712). docs/elastic.md measures both. core/dist.py adds its
# per-attempt prefix only to a shared store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

[ "${DOCTOR:-1}" = 0 ] || "$PYTHON" -m ddp_demo.doctor "$@"

# --local-addr: the address this node advertises to the others; without it torchrun uses what
# the hostname resolves to, which is loopback on many machines (the doctor's "hostname" check).
# NNODES=MIN:MAX with MAX_RESTARTS > 0 lets the job lose nodes down to MIN and take new ones up
# to MAX; RDZV_CONF tunes how long a rendezvous waits for them (docs/elastic.md).
torchrun_train --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" ${MAX_RESTARTS:+--max-restarts="$MAX_RESTARTS"} \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RDZV_ID" \
  --rdzv-conf="is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} \
  -m ddp_demo.train "$@"
