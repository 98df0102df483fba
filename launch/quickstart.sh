#!/usr/bin/env bash
# The main job on its built-in default, with its own set-up: creates .venv if needed, then
# runs `recon3d quickstart` (arguments are passed through; see `recon3d quickstart --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the main job needs training and the report's pictures, not the test tools
RECON3D_EXTRAS="${RECON3D_EXTRAS:-train,report}" bash "$ROOT/launch/ensure_env.sh"
exec "$ROOT/.venv/bin/recon3d" quickstart "$@"
