# shellcheck shell=bash
# Shared by launch/train_local.sh and launch/torchrun_multinode.sh (source it, do not run it):
# run `recon3d train` under torchrun, retry the whole job on failure, stop cleanly on a signal.
#
# Retries. torchrun runs with --max-restarts=0 (its in-place restart failed or hung with gloo);
# when it exits non-zero the whole job is started again, with a fresh rendezvous and
# `--resume auto`, at most MAX_RESTARTS times, RETRY_DELAY seconds apart. Every attempt resumes
# from the run's latest complete checkpoint, so a crash costs the steps since that save. A run
# that diverged (its last metrics.jsonl event) is not retried: it would diverge again.
#
# Signals. SIGTERM or SIGUSR1 asks for a stop: every rank saves at the next step boundary and
# exits 0 (pipeline/train/preemption.py), the script does not retry and exits 0 (or torchrun's
# status if the save did not happen). The signal must reach the workers exactly once, because
# recon3d treats a second one as "kill now":
#   * torchrun ignores SIGTERM and SIGUSR1 (under SLURM every process of the step gets them,
#     and torchrun would forward a second copy or die of SIGUSR1); its workers get the
#     default handlers back before recon3d installs its own;
#   * this script forwards the signal to the workers (torchrun's children, which run in sessions
#     of their own, so a signal to this script's process group never reaches them twice) —
#     except inside a SLURM step, where slurmstepd has already signalled them
#     (FORWARD_SIGNALS=auto|yes|no; say yes on clusters with proctrack/pgid).
# SIGINT (Ctrl-C) is a stop like SIGTERM: the workers save at the next step and the script exits
# 0 without retrying (a second Ctrl-C more than 5 s later kills them, losing only that step).
# SIGHUP and SIGQUIT abort: they go to torchrun, which stops the workers without a save, and the
# script exits non-zero without retrying.
#
# Settings (environment):
#   NPROC_PER_NODE     workers on this node (default: 1)
#   MAX_RESTARTS       whole-job retries after a failure (default: 3)
#   RETRY_DELAY        seconds between a failure and the retry (default: 30; long enough for the
#                      other nodes' workers to fail too, so every node restarts together)
#   SHUTDOWN_TIMEOUT   seconds torchrun waits for workers after a failure before SIGKILL (30)
#   FORWARD_SIGNALS    auto (default) | yes | no: see above
#   RECON3D_PYTHON     the Python with recon3d installed (default: .venv/bin/python, else python3)
# Collective timeouts are the config's `deepspeed.timeout_s` (a dead rank ends the job after it).

set -uo pipefail

RECON3D_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z ${RECON3D_PYTHON:-} ]]; then
    if [[ -x $RECON3D_ROOT/.venv/bin/python ]]; then RECON3D_PYTHON=$RECON3D_ROOT/.venv/bin/python; else RECON3D_PYTHON=python3; fi
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RETRY_DELAY=${RETRY_DELAY:-30}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-30}
FORWARD_SIGNALS=${FORWARD_SIGNALS:-auto}

# The worker: `recon3d train`, after restoring the default SIGTERM/SIGUSR1 actions that torchrun's
# ignoring them would otherwise pass on (a stop asked for before recon3d's handlers exist must
# not be lost).
_RECON3D_WORKER='import signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGUSR1)]; signal.signal(signal.SIGINT, signal.default_int_handler); from pipeline.cli import main; sys.exit(main())'

_launch_log() { printf '[launch %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

_launch_children() {  # direct children of pid $1, read from /proc (no procps needed)
    local f line ppid
    for f in /proc/[0-9]*/stat; do
        { read -r line < "$f"; } 2>/dev/null || continue
        read -r _ ppid _ <<< "${line##*) }"
        if [[ $ppid == "$1" ]]; then f=${f#/proc/}; echo "${f%/stat}"; fi
    done
}

_launch_forwarding() {
    case $FORWARD_SIGNALS in
        yes) return 0 ;;
        no) return 1 ;;
        *) [[ -z ${SLURM_STEP_ID:-} ]] ;;
    esac
}

_LAUNCH_AGENT=""   # torchrun's pid while it runs
_LAUNCH_STOP=""    # the stop signal received, if any
_LAUNCH_ABORT=""   # the abort signal received, if any

_launch_on_stop() {
    _LAUNCH_STOP=$1
    if [[ -z $_LAUNCH_AGENT ]]; then _launch_log "SIG$1 between attempts: not retrying"; return; fi
    if _launch_forwarding; then
        local pid
        for pid in $(_launch_children "$_LAUNCH_AGENT"); do kill -s "$1" "$pid" 2>/dev/null; done
        _launch_log "SIG$1: asked the workers to save at the next step and stop"
    else
        _launch_log "SIG$1: the workers got it from SLURM; waiting for them to save and stop"
    fi
}

_launch_on_abort() {
    _LAUNCH_ABORT=$1
    _launch_log "SIG$1: aborting (no save, no retry)"
    if [[ -n $_LAUNCH_AGENT ]]; then kill -s "$1" "$_LAUNCH_AGENT" 2>/dev/null; fi
}

# recon3d_run_finished RUN_DIR: whether the run's latest complete checkpoint is at run.max_steps.
recon3d_run_finished() {
    "$RECON3D_PYTHON" - "$1" <<'PY'
import sys
from pathlib import Path

from pipeline.train import CheckpointError, load_config, read_checkpoint

run = Path(sys.argv[1])
if not (run / "config.resolved.yaml").is_file():
    sys.exit(1)
cfg = load_config(run / "config.resolved.yaml")
try:
    step = read_checkpoint(Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run / "checkpoints").step
except CheckpointError:
    step = 0
sys.exit(0 if step >= cfg.run.max_steps else 1)
PY
}

# recon3d_run_diverged RUN_DIR: whether the run's last event is a divergence (a retry would resume
# from the same checkpoint with the same settings and diverge again).
recon3d_run_diverged() {
    "$RECON3D_PYTHON" - "$1" <<'PY'
import json
import sys
from pathlib import Path

log = Path(sys.argv[1]) / "metrics.jsonl"
last = None
if log.is_file():
    for line in log.read_text().splitlines():
        try:
            last = json.loads(line)
        except ValueError:
            continue
sys.exit(0 if isinstance(last, dict) and last.get("event") == "diverged" else 1)
PY
}

# recon3d_train_with_retries CONFIG RUN_DIR [recon3d train options...]
#   with the torchrun rendezvous options in the array TORCHRUN_RDZV (set by the caller).
recon3d_train_with_retries() {
    if [[ $# -lt 2 ]]; then _launch_log "usage: ... CONFIG RUN_DIR [recon3d train options]"; return 2; fi
    local config=$1 run_dir=$2 arg
    shift 2
    for arg in "$@"; do
        if [[ $arg == --resume* ]]; then
            _launch_log "do not pass --resume: every attempt uses '--resume auto' (the run's latest checkpoint)"
            return 2
        fi
    done
    trap '_launch_on_stop TERM' TERM
    trap '_launch_on_stop USR1' USR1
    trap '_launch_on_stop INT' INT
    trap '_launch_on_abort HUP' HUP
    trap '_launch_on_abort QUIT' QUIT

    local attempt=0 rc started
    while true; do
        attempt=$((attempt + 1))
        _launch_log "attempt $attempt of $((MAX_RESTARTS + 1)): $NPROC_PER_NODE worker(s) on this node, run dir $run_dir"
        started=$SECONDS
        # Its own process group (set -m), so a Ctrl-C reaches it only through _launch_on_abort.
        set -m
        (
            trap '' TERM USR1 INT
            exec "$RECON3D_PYTHON" -m torch.distributed.run \
                "${TORCHRUN_RDZV[@]}" \
                --nproc-per-node="$NPROC_PER_NODE" \
                --max-restarts=0 \
                --monitor-interval=1 \
                --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
                --signals-to-handle=SIGHUP,SIGQUIT \
                --no-python "$RECON3D_PYTHON" -c "$_RECON3D_WORKER" \
                train "$config" --run-dir "$run_dir" --resume auto "$@"
        ) &
        _LAUNCH_AGENT=$!
        set +m
        while true; do
            wait "$_LAUNCH_AGENT"
            rc=$?
            # wait returns early (status > 128) when a trapped signal arrives; the agent lives on.
            if [[ $rc -gt 128 ]] && kill -0 "$_LAUNCH_AGENT" 2>/dev/null; then continue; fi
            break
        done
        _LAUNCH_AGENT=""
        local took=$((SECONDS - started))
        if [[ $rc -eq 0 ]]; then
            if [[ -n $_LAUNCH_STOP ]]; then
                _launch_log "stopped by SIG$_LAUNCH_STOP after saving (attempt $attempt, ${took} s); resume with the same command"
            else
                _launch_log "done (attempt $attempt, ${took} s)"
            fi
            return 0
        fi
        if [[ -n $_LAUNCH_ABORT ]]; then
            _launch_log "aborted by SIG$_LAUNCH_ABORT: torchrun exited with $rc"
            return "$rc"
        fi
        if [[ -n $_LAUNCH_STOP ]]; then
            _launch_log "SIG$_LAUNCH_STOP received but torchrun exited with $rc (no save since the last checkpoint); not retrying"
            return "$rc"
        fi
        if recon3d_run_diverged "$run_dir"; then
            _launch_log "attempt $attempt: training diverged (see $run_dir/metrics.jsonl); not retrying — lower optimizer.lr or set deepspeed.gradient_clipping, then rerun"
            return "$rc"
        fi
        if [[ $attempt -gt $MAX_RESTARTS ]]; then
            _launch_log "attempt $attempt failed with $rc after ${took} s; no retries left (MAX_RESTARTS=$MAX_RESTARTS)"
            return "$rc"
        fi
        _launch_log "attempt $attempt failed with $rc after ${took} s; retrying in $RETRY_DELAY s with --resume auto"
        sleep "$RETRY_DELAY" &
        wait $! 2>/dev/null || kill $! 2>/dev/null
        if [[ -n $_LAUNCH_STOP || -n $_LAUNCH_ABORT ]]; then return "$rc"; fi
    done
}
