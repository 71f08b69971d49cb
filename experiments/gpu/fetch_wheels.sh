#!/usr/bin/env bash
# Downloads the wheels the H200 image lacks (SpikingJelly and its logger) into .whl/ (git-ignored locally),
# for run_gpu_check.sh. Run here, on a machine that reaches PyPI, before the device call:
#   bash experiments/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl spikingjelly==2.0.0 "loguru>=0.7,<1" 2>&1 | { grep -v "is ignored" || true; }
ls -l .whl
