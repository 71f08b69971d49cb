#!/usr/bin/env bash
# What the CLI says for bad input and for a run that goes non-finite: the last line of stderr of each command.
#
#   bash experiments/reliability/errors.sh
set -u
cd "$(dirname "$0")/../.."
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
TMP=$(mktemp -d)
BASE="--config=configs/quickstart.py:tiny --config.phases=ann --config.ann.num_steps=4"

run() {  # prints the command and its error (from the last line naming an exception to the end), or "ok"
  echo "\$ python -m dtvit.main ... $*"
  if .venv/bin/python -m dtvit.main $BASE "$@" > /dev/null 2> "$TMP/err"; then echo ok; else
    grep -v '^[IW][0-9]' "$TMP/err" | awk '/^[A-Za-z_.]*(Error|Exception): /{n=NR} {l[NR]=$0}
      END{for(i=n;i<=NR;i++) print l[i]}' | cut -c1-700; fi
  echo
}

run --workdir=$TMP/a --config.snn.time_csot=0.1
run --workdir=$TMP/b --config.model.num_steps=0
run --workdir=$TMP/c --config.model.neuron.surrogate=tanh
run --workdir=$TMP/d --config.ann.batch_size=12
run --workdir=$TMP/e --config.data.name=cifar10 --config.data.data_dir=$TMP/empty
run --workdir=$TMP/f --config.phases=snn --config.snn.init_from=$TMP/nowhere
run --workdir=$TMP/g
run --workdir=$TMP/g --config.ann.optimizer.lr=0.5
run --workdir=$TMP/h --config.ann.num_steps=30 --config.ann.checkpoint_every=1 --config.ann.optimizer.lr=1e32 \
  --config.ann.optimizer.warmup_steps=0
run --workdir=$TMP/i --config.ann.optimizer.lr=1e39
rm -rf "$TMP"
