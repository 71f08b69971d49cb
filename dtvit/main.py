"""Command line: `python -m dtvit.main --config=configs/quickstart.py --workdir=workdirs/quickstart`.

Overrides: `--config=configs/cifar10_spikformer.py:tiny` (the config's argument) and `--config.snn.time_cost=0.05`
(any field; the config is locked, so a mistyped key is an error). `--overwrite` moves an existing run with a
different config aside instead of refusing.

Several processes (hosts): start the same command in each with `--config.distributed=True`; on a TPU pod slice
or under SLURM `jax.distributed.initialize()` finds the others by itself, elsewhere give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (any of these flags also turns distributed
mode on). SIGTERM (preemption) checkpoints the current step and exits with status 143; rerun to resume.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
flags.DEFINE_bool("overwrite", False, "Move aside an existing run in --workdir whose config differs.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator service "
                    "(default: from the cluster environment, or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes (default: from the cluster).")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: schedulers treat it as preempted, not done.
PREEMPTED_EXIT_STATUS = 143


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if config.distributed or any(x is not None for x in explicit):
    # Unset values come from the cluster environment (TPU pod, SLURM, Open MPI, Kubernetes).
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  from dtvit import train  # after distributed init: nothing may touch the backend earlier

  logging.info("devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
  try:
    summary = train.run(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except train.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_STATUS)
  if jax.process_index() == 0:
    print(json.dumps(_headline(summary), indent=2))
    print(f"summary: {os.path.join(FLAGS.workdir, 'summary.json')}")


def _headline(summary):
  out = {}
  for phase in summary.get("phases", []):
    s = summary.get(phase, {})
    keys = ("test_accuracy", "test_accuracy_fixed_T", "mask_semantics", "average_time_steps",
            "average_simulated_steps", "op_weighted_time_steps", "op_weighted_simulated_steps",
            "per_module_time_steps", "per_module_simulated_steps", "T_max", "train_time_s")
    out[phase] = {k: s[k] for k in keys if k in s}
    if "energy" in s:
      out[phase]["energy"] = s["energy"]["totals"]
  out["wall_time_s"] = summary.get("wall_time_s")
  return out


if __name__ == "__main__":
  app.run(main)
