"""Command line: `python -m dtvit.main --config=configs/quickstart.py --workdir=workdirs/quickstart`.

Overrides: `--config=configs/cifar10_spikformer.py:tiny` (the config's argument) and `--config.snn.time_cost=0.05`
(any field; the config is locked, so a mistyped key is an error). `--overwrite` moves an existing run with a
different config aside instead of refusing. Multi-host: set `--config.distributed=True` (or launch with the
JAX coordinator environment of your cluster / TPU pod) so `jax.distributed.initialize()` runs first.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
flags.DEFINE_bool("overwrite", False, "Move aside an existing run in --workdir whose config differs.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.distributed:
    jax.distributed.initialize()
  from dtvit import train  # after distributed init: nothing may touch the backend earlier

  logging.info("devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
  summary = train.run(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  if jax.process_index() == 0:
    print(json.dumps(_headline(summary), indent=2))
    print(f"summary: {os.path.join(FLAGS.workdir, 'summary.json')}")


def _headline(summary):
  out = {}
  for phase in summary.get("phases", []):
    s = summary.get(phase, {})
    keys = ("test_accuracy", "test_accuracy_fixed_T", "average_time_steps", "op_weighted_time_steps",
            "per_module_time_steps", "T_max", "train_time_s")
    out[phase] = {k: s[k] for k in keys if k in s}
    if "energy" in s:
      out[phase]["energy"] = s["energy"]["totals"]
  out["wall_time_s"] = summary.get("wall_time_s")
  return out


if __name__ == "__main__":
  app.run(main)
