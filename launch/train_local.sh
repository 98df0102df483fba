#!/usr/bin/env bash
# Train on this machine under torchrun (standalone rendezvous), retrying the whole job on failure.
#
#   NPROC_PER_NODE=2 launch/train_local.sh CONFIG RUN_DIR [--set KEY=VALUE ...]
#
# Every attempt runs `recon3d train CONFIG --run-dir RUN_DIR --resume auto ...`, so running the
# same command again continues the run. SIGTERM/SIGUSR1: save at the next step, exit 0.
# Settings (MAX_RESTARTS, RETRY_DELAY, ...): see launch/torchrun_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_common.sh"
TORCHRUN_RDZV=(--standalone --nnodes=1)
recon3d_train_with_retries "$@"
