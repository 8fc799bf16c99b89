#!/usr/bin/env bash
# The GPU lane of the tangent comparison (a lent device, one command; prints Markdown tables headed
# by the device's name): the U-Net throughput table for the JVP and both finite differences, fp32
# and bf16, eager and compiled (the differences run on SDPA's default kernels, flash included),
# then the MLP step-cost table with the memory ratio.
#   bash benchmarks/gpu_tangents.sh [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPEATS=${1:-20}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY benchmarks/throughput.py --device cuda --sizes digits fashion_mnist --precision fp32 bf16 --compile \
  --tangents jvp central forward --repeats "$REPEATS"
$PY benchmarks/cost.py --device cuda --tangents jvp,central,forward --repeats "$REPEATS"
