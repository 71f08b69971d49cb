#!/usr/bin/env bash
# The benchmark of experiments/benchmarks on a lent H200 (jax 0.11 with CUDA and torch in its python3).
# Here:   bash experiments/gpu/fetch_wheels.sh
# Device: run(command="bash experiments/gpu/run_gpu_check.sh", carry=[".whl"], timeout_s=600)
# It finishes within ~9 minutes and leaves under $OUT: gpu.json, gpu.md (the table for
# experiments/benchmarks/README.md), env.txt and log.txt.
set -uo pipefail
OUT="${OUT:-/tmp/dtvit_gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import sys, jax, torch; print(sys.version); print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || exit 1
fi
export PYTHONUNBUFFERED=1
# JAX and torch run in two processes on one GPU: let each allocate what it uses.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 560 python3 -m experiments.gpu.gpu_check --out "$OUT" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
