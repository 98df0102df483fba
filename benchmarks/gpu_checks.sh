#!/usr/bin/env bash
# The CUDA checks in one go, for a machine with a GPU and a CUDA build of torch:
#   the `gpu`-marked tests (operators, models, training with NCCL/bf16, reconstruction on the
#   GPU) and the CUDA figures of benchmarks/memory.py. Logs go to ${OUT:-gpu-checks}/.
#   bash benchmarks/gpu_checks.sh            # with recon3d's requirements installed
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG="${OUT:-gpu-checks}"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi -L 2>&1 | tee "$LOG/device.txt"
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$LOG/device.txt"
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$LOG/gpu_tests.log" | tail -25
for section in ${SECTIONS:-ei absolute}; do
  timeout "${BENCH_TIMEOUT:-120}" "$PY" benchmarks/memory.py --section "$section" --device cuda --repeat 5 2>&1 \
    | tee "$LOG/memory_cuda_$section.log" | tail -15
done
