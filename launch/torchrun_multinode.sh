#!/usr/bin/env bash
# Train on one node of an M-node job: run this on every node with the same settings.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node001:29500 RDZV_ID=mri-ei \
#       launch/torchrun_multinode.sh CONFIG RUN_DIR [--set KEY=VALUE ...]
#
#   NNODES          nodes in the job (required)
#   RDZV_ENDPOINT   host:port of the rendezvous; the node whose address is `host` serves it
#                   (required; use the first node's hostname)
#   RDZV_ID         the job's name, the same on every node (default: the run directory's name)
#   RDZV_JOIN_TIMEOUT  seconds an agent waits for the others to join (default: 600)
#   NPROC_PER_NODE, MAX_RESTARTS, RETRY_DELAY, ...: see launch/torchrun_common.sh
#
# RUN_DIR must be on storage every node sees (checkpoints are written by every rank). Each
# attempt is a fresh c10d rendezvous: the endpoint node's agent serves it and is restarted too;
# all nodes retry RETRY_DELAY after a failure (a dead rank makes every other rank fail within
# the collective timeout, `deepspeed.timeout_s`). Under SLURM use launch/slurm/train.sbatch,
# which restarts every node together itself.
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_common.sh"
: "${NNODES:?set NNODES, the number of nodes in the job}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the first node and a free port)}"
if [[ $# -ge 2 ]]; then RDZV_ID=${RDZV_ID:-recon3d-$(basename "$2")}; fi
TORCHRUN_RDZV=(
    --nnodes="$NNODES"
    --rdzv-backend=c10d
    --rdzv-endpoint="$RDZV_ENDPOINT"
    --rdzv-id="${RDZV_ID:-recon3d}"
    --rdzv-conf="join_timeout=${RDZV_JOIN_TIMEOUT:-600}"
)
recon3d_train_with_retries "$@"
