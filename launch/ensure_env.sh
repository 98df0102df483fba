#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install recon3d into it.
#
# Idempotent: a second run only checks a stamp. Torch is installed first, on its own, so that
# pip does not resolve the package's `torch>=2.4` range to a multi-GB CUDA build on machines
# that only want the CPU wheel. Override with RECON3D_TORCH_SPEC (e.g. "torch==2.13.0" or a
# CUDA index URL through PIP_INDEX_URL) on GPU machines.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RECON3D_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${RECON3D_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${RECON3D_EXTRAS:-test}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[recon3d] creating virtual environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

STAMP="$VENV/.recon3d-installed-${EXTRAS//,/+}"  # one per set of extras: the main job and the tests do not undo each other
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/launch/ensure_env.sh" | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[recon3d] installing $TORCH_SPEC" >&2
    "$VENV/bin/pip" install -q "$TORCH_SPEC"
fi
echo "[recon3d] installing recon3d[$EXTRAS] (editable)" >&2
"$VENV/bin/pip" install -q -e "$ROOT[$EXTRAS]"
echo "$WANT" > "$STAMP"
