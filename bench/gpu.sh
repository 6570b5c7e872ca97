#!/usr/bin/env bash
# GPU benchmark, prepared for a machine with an NVIDIA GPU (none on the development machines):
# bf16 embedding throughput (cells/s) and fine-tuning peak GPU memory with and without ZeRO
# offload for the gf-12L-104M-i4096 architecture; appends the results to docs/benchmarks.md.
#
#   make venv                       # with a CUDA torch: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126
#   bench/gpu.sh [--cells 2000] [--batch-size 32] [--steps 6]
#
# ZeRO offload uses DeepSpeed's CPU Adam, compiled on first use (needs a C++ compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if ! command -v nvidia-smi > /dev/null || ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PYTHON; run it on a GPU machine" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
export PATH="$(dirname "$PYTHON"):$PATH"
exec "$PYTHON" bench/gpu_bench.py "$@"
