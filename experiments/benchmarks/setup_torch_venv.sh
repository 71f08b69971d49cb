#!/usr/bin/env bash
# Creates the PyTorch + SpikingJelly venv the benchmark's peer side runs in (kept apart from dtvit's JAX venv).
# Run: bash experiments/benchmarks/setup_torch_venv.sh [VENV_DIR]   (default experiments/benchmarks/.venv-torch)
# torch is pinned to 2.13.0: on the dev machines pip takes that CPU build from a local wheel; any other version
# (or an unpinned `torch` pulled in by spikingjelly) would download a multi-GB CUDA build.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/.venv-torch}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# pip warns once per package about this machine's partial local index folders; the warnings are noise.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
quiet "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
# Installed with torch already pinned so its torch requirement is satisfied and nothing else is pulled for torch.
quiet "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" spikingjelly
# spikingjelly.datasets needs extra packages and is not used; the modules the benchmark needs must import.
"$VENV/bin/python" - <<'PY'
import torch
from spikingjelly.activation_based import functional, layer, neuron  # noqa: F401
from spikingjelly.activation_based.model import spikformer  # noqa: F401
from importlib import metadata
print(f"torch {torch.__version__}, spikingjelly {metadata.version('spikingjelly')}: ok")
PY
