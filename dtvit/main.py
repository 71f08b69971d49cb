"""Command line: `python -m dtvit.main --config=configs/quickstart.py --workdir=workdirs/quickstart`.

Overrides: `--config=configs/cifar10_spikformer.py:tiny` (the config's argument) and `--config.snn.time_cost=0.05`
(any field; the config is locked, so a mistyped key is an error, shown with a "did you mean"). A rerun with the
same --workdir resumes the run there: the logging, evaluation and checkpoint cadences may change and a phase's
train_steps may grow; any other change needs `--allow_changes=key,...` and is kept in
<workdir>/config_history.json (`dtvit.workdir`). `--overwrite` moves the earlier run aside instead. A rerun of a
finished run prints its summary and changes nothing.

Several processes (hosts): start the same command in each with `--config.distributed=True`; on a TPU pod slice
or under SLURM `jax.distributed.initialize()` finds the others by itself, elsewhere give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (any of these flags also turns distributed
mode on). SIGTERM (preemption) or Ctrl-C (SIGINT) checkpoints the current step and exits with status 143 or 130;
rerun to resume. One run at a time per workdir: a second launch into a workdir that a running launch holds stops
at once, naming the holder. Errors in the command (a config key, a config file, a value, a workdir holding another
run, a non-finite step) print one line saying what to change, with exit status 2 (command line) or 1 (run); the
traceback is logged at --verbosity=1.
"""

import glob
import json
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dtvit import config_lib

config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
flags.DEFINE_bool("overwrite", False, "Move aside an existing run in --workdir whose config differs.")
flags.DEFINE_list("allow_changes", [], "Resume the run in --workdir with these config keys changed (dotted, "
                  "comma-separated, e.g. snn.optimizer.lr; a key names its subtree too); each launch's changes "
                  "are kept in <workdir>/config_history.json.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator service "
                    "(default: from the cluster environment, or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes (default: from the cluster).")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
# 128 + the signal, what a shell reports for a process the signal ended: schedulers treat SIGTERM's as
# preempted, not done, and shells Ctrl-C's as interrupted.
PREEMPTED_EXIT_STATUS = 143
INTERRUPTED_EXIT_STATUS = 130
ERROR_EXIT_STATUS = 1   # the run stopped on a user error (one line on stderr)
USAGE_EXIT_STATUS = 2   # the command line is wrong (one line on stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if config.distributed or any(x is not None for x in explicit):
    # Unset values come from the cluster environment (TPU pod, SLURM, Open MPI, Kubernetes).
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  from dtvit import train, workdir_lock  # after distributed init: nothing may touch the backend earlier

  logging.info("devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
  try:
    summary = train.run(config, FLAGS.workdir, overwrite=FLAGS.overwrite, allow_changes=FLAGS.allow_changes)
  except train.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(128 + int(e.signum))
  except KeyboardInterrupt:
    print("interrupted: stopped outside the training steps (or by a second Ctrl-C), nothing saved since the "
          "last checkpoint; rerun the same command to resume from it.", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_STATUS)
  except workdir_lock.WorkdirBusyError as e:  # its message names the holder and what to do
    print(f"error: {e}", file=sys.stderr)
    sys.exit(ERROR_EXIT_STATUS)
  except train.NonFiniteError as e:
    _fail(f"NonFiniteError: {e}", _nonfinite_advice(e, config))
  except (ValueError, OSError) as e:  # bad config values, missing data, a workdir holding another run...
    _fail(f"{type(e).__name__}: {e}")
  if jax.process_index() == 0:
    print(json.dumps(_headline(summary), indent=2))
    print(f"summary: {os.path.join(FLAGS.workdir, 'summary.json')}")


def _fail(message: str, advice: str = "") -> None:
  logging.debug("traceback of the error below:", exc_info=True)
  print(f"error: {message}{advice}\n(the traceback: add --verbosity=1)", file=sys.stderr)
  sys.exit(ERROR_EXIT_STATUS)


def _rerun_command(argv: list[str], set_flags: dict[str, str]) -> str:
  """This launch's command line with `set_flags` ({flag name: value}) replacing any value given before."""
  out, skip = [], False
  for arg in argv[1:]:
    if skip:
      skip = False
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("--") and name in set_flags:
      skip = "=" not in arg  # the '--flag value' spelling
      continue
    out.append(arg)
  return shlex.join(["python", "-m", "dtvit.main", *out, *(f"--{k}={v}" for k, v in set_flags.items())])


def _nonfinite_advice(error, config) -> str:
  """The exact commands that resume after a non-finite step: with a 10x lower learning rate, or skipping."""
  phase = getattr(error, "phase", None)
  if phase is None:
    return ""
  key = f"{phase}.optimizer.lr"
  allow = ",".join(dict.fromkeys([*FLAGS.allow_changes, key]))
  lower = _rerun_command(sys.argv, {f"config.{key}": f"{config[phase].optimizer.lr / 10:.3g}",
                                    "allow_changes": allow})
  advice = f"\nTo rerun with a 10x lower learning rate (from the last good checkpoint, if any):\n  {lower}"
  if getattr(error, "skipping", False):  # skipping already, and every batch went non-finite
    return advice
  skip = _rerun_command(sys.argv, {f"config.{phase}.nonfinite": "skip"})
  return f"{advice}\nor skipping such batches:\n  {skip}"


# ------------------------------------------------------------------------------------------------------------
# Errors in the command line, explained in one line.


def _parse_flags(argv: list[str]) -> list[str]:
  """`FLAGS(argv)`; a bad flag, config key or config file prints one line and exits with USAGE_EXIT_STATUS."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises here, at its first use
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:  # not a config file's bug
    print(f"error: {_explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


def _flag_values(argv: list[str], prefix: str) -> list[tuple[str, str]]:
  """(name, value) of each `--<prefix>...=value` / `--<prefix>... value` argument."""
  out = []
  for i, arg in enumerate(argv[1:], 1):
    name, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and (name == prefix or name.startswith(prefix + ".")):
      out.append((name, value if eq else (argv[i + 1] if i + 1 < len(argv) else "")))
  return out


def _explain_flag_error(argv: list[str], error: Exception) -> str:
  specs = [v for n, v in _flag_values(argv, "config") if n == "config"]
  path = specs[-1].split(":", 1)[0] if specs else ""
  if path and not os.path.isfile(path):
    recipes = sorted(p for p in glob.glob("configs/*.py") if not p.endswith(("__init__.py", "common.py")))
    return (f"config file {path!r} not found (relative to {os.getcwd()}); give the path of a recipe"
            + (f", e.g. {', '.join(recipes)}." if recipes else "."))
  config = _load_config(specs[-1]) if specs else None
  keys = config_lib.all_keys(config.to_dict()) if config is not None else None
  for name, _ in _flag_values(argv, "config"):
    if keys is not None and name != "config" and name[len("config."):] not in keys:
      return config_lib.explain_unknown_key(keys, name[len("config."):])
  lines = [l for l in str(error).replace("\\n", "\n").splitlines() if l.strip()]
  return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _load_config(spec: str):
  """The config of `--config=<spec>` without any override, or None when it does not load (its own error says
  why)."""
  argv = ["main", f"--config={spec}"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
    return fv.config
  except Exception:
    return None


def _headline(summary):
  out = {}
  for phase in summary.get("phases", []):
    s = summary.get(phase, {})
    keys = ("test_accuracy", "test_accuracy_fixed_T", "mask_semantics", "average_time_steps",
            "average_simulated_steps", "op_weighted_time_steps", "op_weighted_simulated_steps",
            "per_module_time_steps", "per_module_simulated_steps", "T_max", "train_time_s", "cpu_time_s")
    out[phase] = {k: s[k] for k in keys if k in s}
    if "energy" in s:
      out[phase]["energy"] = s["energy"]["totals"]
  out["wall_time_s"] = summary.get("wall_time_s")
  return out


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
