#!/usr/bin/env bash
# What the CLI says for bad input, for a run that goes non-finite (and what following its advice does), for a
# rerun of a finished run, for resumes with changed keys, and for a damaged latest checkpoint: each command's
# stderr without the log lines (those of the resume and checkpoint lines are kept), and its exit status.
#
#   bash experiments/reliability/errors.sh
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
TMP=$(mktemp -d)
BASE=(--config=configs/quickstart.py:tiny --config.phases=ann --config.ann.train_steps=4)

show() {  # prints the command, then its stderr less log lines, then its exit status
  echo "\$ $*" | sed "s|$TMP|\$TMP|g; s|--config=configs/quickstart.py:tiny --config.phases=ann --config.ann.train_steps=4|...|"
  "$@" > "$TMP/out" 2> "$TMP/err"
  local rc=$?
  grep -v '^[IW][0-9]\|^WARNING:absl:\|^INFO:' "$TMP/err" | cut -c1-700 | sed "s|$TMP|\$TMP|g"
  grep 'is unreadable\|resumed from step\|nothing to do' "$TMP/err" | sed 's/^.*\] //' | cut -c1-400 \
    | sed "s|$TMP|\$TMP|g"
  grep -c '"test_accuracy"' "$TMP/out" | sed 's/^/(summary printed: /; s/$/ phase)/' | grep -v ': 0 '
  echo "exit status $rc"
  echo
}
run() { show "$PY" -m dtvit.main "${BASE[@]}" "$@"; }

run --workdir=$TMP/a --config.snn.time_csot=0.1
run --workdir=$TMP/a --config.optimizer.lr=0.1
show "$PY" -m dtvit.main --config=configs/quickstrat.py:tiny --workdir=$TMP/a
run --workdir=$TMP/b --config.model.max_time_steps=0
run --workdir=$TMP/c --config.model.neuron.surrogate=tanh
run --workdir=$TMP/d --config.ann.batch_size=12
run --workdir=$TMP/e --config.data.name=cifar10 --config.data.data_dir=$TMP/empty
run --workdir=$TMP/f --config.phases=snn --config.snn.init_from=$TMP/nowhere
ls $TMP/a $TMP/e $TMP/f 2>&1 | sed "s|$TMP|\$TMP|g"; echo
# A finished run, rerun as is and with another log cadence; then with another learning rate.
run --workdir=$TMP/g --config.ann.checkpoint_every=1 --config.ann.max_to_keep=4
run --workdir=$TMP/g --config.ann.checkpoint_every=1 --config.ann.max_to_keep=4 --config.ann.log_every=2
run --workdir=$TMP/g --config.ann.checkpoint_every=1 --config.ann.max_to_keep=4 --config.ann.optimizer.lr=0.5
# Its latest checkpoint damaged (half of each array file), then extended by 2 steps.
rm $TMP/g/summary.json
for f in $(find $TMP/g/ann/checkpoints/4/state -path '*/d/*' -type f); do truncate -s $(($(stat -c %s "$f") / 2)) "$f"; done
run --workdir=$TMP/g --config.ann.checkpoint_every=1 --config.ann.max_to_keep=4 --config.ann.train_steps=6
ls $TMP/g/ann/checkpoints $TMP/g/ann/checkpoints/corrupt | sed "s|$TMP|\$TMP|g"; echo
# Non-finite: the advice, then each printed command run as printed.
H=(--workdir=$TMP/h --config.ann.train_steps=30 --config.ann.checkpoint_every=1 --config.ann.optimizer.lr=1e32
   --config.ann.optimizer.warmup_steps=0)
run "${H[@]}"
cp -r $TMP/h $TMP/h_failed
grep '^  python -m dtvit.main' "$TMP/err" > "$TMP/advice"
while read -r _ _ _ args; do
  rm -rf $TMP/h; cp -r $TMP/h_failed $TMP/h
  eval "show \"$PY\" -m dtvit.main $args"
done < "$TMP/advice"
run --workdir=$TMP/i --config.ann.optimizer.lr=1e39
rm -rf "$TMP"
