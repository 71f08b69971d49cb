#!/usr/bin/env bash
# Reruns the whole CIFAR-10 CPU sweep from scratch and regenerates its table, plot and report.
#
#   bash experiments/cifar10_cpu/rerun_all.sh                 # into experiments/cifar10_cpu/runs
#   bash experiments/cifar10_cpu/rerun_all.sh /tmp/c10_runs   # elsewhere
#
# An existing run directory is moved aside (<root>.old-<date>), never deleted. The sweep takes about 2 hours
# on 2 CPU cores; it can be stopped at any time and resumed with
#   .venv/bin/python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root=<root>
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${1:-experiments/cifar10_cpu/runs}"
ARCHIVE="../shared/data/cifar10-jpg.tar.gz"
if [ ! -f "$ARCHIVE" ] && [ ! -d data_dir/image_folder_arrays/cifar10_jpg_32 ]; then
  echo "rerun_all.sh: the CIFAR-10 archive $ARCHIVE is missing (and no prepared copy in data_dir/)." >&2
  echo "Put the JPEG archive there (train/<class>/*.jpg, test/<class>/*.jpg) or set data.archive." >&2
  exit 2
fi
[ -x .venv/bin/python ] || make venv
if [ -e "$ROOT" ]; then
  OLD="$ROOT.old-$(date +%Y%m%d-%H%M%S)"
  mv "$ROOT" "$OLD"
  echo "rerun_all.sh: moved the previous runs to $OLD"
fi
mkdir -p "$ROOT"
{ .venv/bin/python -m dtvit.sweep --config=experiments/cifar10_cpu/config.py --root="$ROOT" \
  && .venv/bin/python -m experiments.cifar10_cpu.analyse --root="$ROOT"; } 2>&1 | tee "$ROOT/sweep.log"
