"""A trained run's weights as a small checkpoint: params and batch_stats, without the optimizer state.

  python -m dtvit.slim --workdir=workdirs/quickstart --out=slim/quickstart [--phase=snn] [--allow_unfinished]
  python -m dtvit.slim --workdir=workdirs/quickstart --in_place [--phase=snn]

A run's checkpoints hold its whole train state (params, batch_stats, Adam's moments, the step), about three times
its weights. For each phase with a committed checkpoint (or only --phase) slim writes the latest step again with
only the collections the model needs (`checkpointing.WEIGHTS`), in dtvit's checkpoint layout
(`<workdir>/<phase>/checkpoints/<step>/state` and `.../meta`); the meta is the original's plus
`"weights_only": true` and `"dropped"`, the collections left out. Every command after training reads such a
checkpoint as it reads a full one (`dtvit.load`, `dtvit.evaluate` and its early exit, `dtvit.predict`,
`dtvit.export`, `dtvit.report`), and so does a new run's `init_from` (`checkpointing.restore_variables`). A
training launch that would resume from it stops with one line (`checkpointing.WeightsOnlyCheckpointError`):
without the optimizer state a run cannot go on.

--out=DIR    a new workdir: the run's records (config.json, summary.json, data_spec.json, config_history.json,
             early_exit/, reports: every file but the workdir lock, TensorBoard event files and checkpoints) and
             the slim checkpoints. The run itself is not written to. DIR must be missing or empty. An unfinished
             run is refused unless --allow_unfinished (its latest checkpoints are copied).
--in_place   replaces each phase's checkpoints of a finished run (never an unfinished one: it could no longer
             resume), holding the workdir's lock (`dtvit.workdir_lock`): the slim step is written to
             `<phase>/checkpoints.slim-tmp`, read back and compared bitwise with the original, then `checkpoints`
             is renamed to `checkpoints.slim-old`, the new folder renamed to `checkpoints`, and the old one
             deleted. A crash leaves the full checkpoints or the verified slim ones; the next call finishes or
             redoes the job. A phase already slim is left as it is. The event files stay, and so do steps
             set aside as damaged (`checkpoints/corrupt/`).

Each phase prints one line: its step and the size of its checkpoints before and after. Local workdirs only.
"""

from __future__ import annotations

import os
import shutil
import sys

from dtvit.loader import PHASES  # the standard library only, as this module at import
TMP_SUFFIX, OLD_SUFFIX = ".slim-tmp", ".slim-old"  # beside <phase>/checkpoints during --in_place
_EVENTS_PREFIX = "events.out.tfevents."


def _size(path: str) -> int:
  """Bytes of the files under `path` (0 when missing)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _check_local(path: str, flag: str) -> None:
  if "://" in str(path):
    raise ValueError(f"{flag}={path}: dtvit.slim works on local folders only; copy the run to local disk "
                     f"first (e.g. gcloud storage cp -r), slim it there and copy it back.")


def _finished_or_refuse(workdir: str, *, in_place: bool, allow_unfinished: bool) -> None:
  from dtvit import loader
  config = loader.read_config(workdir)  # no workdir, no config.json: one line naming it
  progress = loader.unfinished(workdir, config, loader.read_summary(workdir))
  if not progress:
    return
  if in_place:
    raise loader.UnfinishedRunError(
        f"the run in {workdir} is unfinished ({progress}); --in_place would drop the optimizer state "
        f"it needs to resume. Finish it first (rerun its dtvit.main command), or write a slim copy with --out=DIR "
        f"--allow_unfinished.")
  if not allow_unfinished:
    raise loader.UnfinishedRunError(
        f"the run in {workdir} is unfinished ({progress}): its checkpoints are not the trained model. "
        f"Finish it first (rerun its dtvit.main command), or copy its latest checkpoints anyway with "
        f"--allow_unfinished.")


def _phases(workdir: str, phase: str | None) -> list[str]:
  """The phases to slim: `phase`, or every phase with a committed checkpoint (or with one set aside by an
  interrupted --in_place)."""
  from dtvit import workdir as workdir_lib
  ckpt = lambda p: workdir_lib.checkpoint_dir(workdir, p)  # noqa: E731
  present = [p for p in PHASES if workdir_lib.committed_steps(ckpt(p)) or os.path.isdir(ckpt(p) + OLD_SUFFIX)]
  if phase is not None:
    if phase not in present:
      raise FileNotFoundError(f"{workdir} has no committed checkpoint of phase {phase!r} (phases with one: "
                              f"{present}); choose one of those or leave --phase out.")
    return [phase]
  if not present:
    raise FileNotFoundError(f"{workdir} holds no committed checkpoint (<phase>/checkpoints/<step>); pass the "
                            f"--workdir of a training run that saved one.")
  return present


def _same(a: dict, b: dict) -> bool:
  """Whether two {collection: pytree of arrays} are bitwise equal (structure, shapes, dtypes, bytes)."""
  import jax
  import numpy as np
  (la, ta), (lb, tb) = jax.tree.flatten(jax.device_get(a)), jax.tree.flatten(jax.device_get(b))
  return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)
                          and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def _write_slim(source: str, target: str) -> int:
  """Writes the latest step of the checkpoint folder `source` as a weights-only checkpoint into `target` (a new
  folder), read back and checked bitwise; returns the step."""
  from dtvit import checkpointing
  step, weights, meta, dropped = checkpointing.read_weights(source, what="dtvit.slim")
  checkpointing.write_weights(target, step, weights, meta, dropped)
  _, again, meta_again, _ = checkpointing.read_weights(target, step, what="dtvit.slim")
  if not (_same(weights, again) and meta_again.get(checkpointing.WEIGHTS_ONLY)):
    raise OSError(f"the weights written to {target} do not read back equal to {source}/{step}; "
                  f"nothing was replaced. Check the disk and retry.")
  return step


def _copy_records(workdir: str, out: str) -> None:
  """Copies every file of the run but its lock, event files and checkpoint folders (folders as needed)."""
  from dtvit import workdir_lock
  for folder, dirs, files in os.walk(workdir):
    rel = os.path.relpath(folder, workdir)
    if rel != "." and os.path.dirname(rel) == "" and rel in PHASES:  # <phase>/checkpoints* are written anew
      dirs[:] = [d for d in dirs if not d.startswith("checkpoints")]
    dirs.sort()
    for name in sorted(files):
      if name.startswith(_EVENTS_PREFIX) or (rel == "." and name == workdir_lock.LOCK_FILENAME):
        continue
      os.makedirs(os.path.join(out, rel), exist_ok=True)
      shutil.copy2(os.path.join(folder, name), os.path.join(out, rel, name))


def _slim_copy(workdir: str, out: str, phases: list[str]) -> list[dict]:
  from dtvit import workdir as workdir_lib
  rows = []
  for phase in phases:
    source, target = (workdir_lib.checkpoint_dir(d, phase) for d in (workdir, out))
    step = _write_slim(source, target)
    rows.append({"phase": phase, "step": step, "before_bytes": _size(source), "after_bytes": _size(target),
                 "already_slim": False})
  _copy_records(workdir, out)
  return rows


def _keep_corrupt(old: str, ckpt: str) -> None:
  """Moves `old/corrupt` (steps `Checkpointer.restore_latest` set aside: kept, never deleted) into `ckpt`."""
  if os.path.isdir(os.path.join(old, "corrupt")) and not os.path.exists(os.path.join(ckpt, "corrupt")):
    os.rename(os.path.join(old, "corrupt"), os.path.join(ckpt, "corrupt"))


def _recover(ckpt: str) -> None:
  """Undoes or finishes an --in_place that stopped half-way on `<phase>/checkpoints` (see the module docstring)."""
  from dtvit import checkpointing
  from dtvit import storage
  old, tmp = ckpt + OLD_SUFFIX, ckpt + TMP_SUFFIX
  if os.path.isdir(old) and not os.path.isdir(ckpt):  # stopped between the two renames: the original back
    os.rename(old, ckpt)
    storage._fsync_dir(os.path.dirname(ckpt))
  if os.path.isdir(old):  # stopped before the old folder was deleted: only once the slim one is in place
    steps = checkpointing.weights_only_steps(ckpt)
    if not (steps and all(steps.values())):
      raise OSError(f"both {ckpt} and {old} hold checkpoints, and {ckpt} is not weights-only; this "
                    f"is not a state dtvit.slim leaves. Keep the one you want as {ckpt}, remove the other, rerun.")
    _keep_corrupt(old, ckpt)
    shutil.rmtree(old)
  if os.path.isdir(tmp):  # an unfinished write: garbage
    shutil.rmtree(tmp)


def _slim_in_place(workdir: str, phases: list[str]) -> list[dict]:
  from dtvit import checkpointing
  from dtvit import storage
  from dtvit import workdir as workdir_lib
  rows = []
  for phase in phases:
    ckpt = workdir_lib.checkpoint_dir(workdir, phase)
    _recover(ckpt)
    steps = checkpointing.weights_only_steps(ckpt)
    before = _size(ckpt)
    if steps and all(steps.values()):
      rows.append({"phase": phase, "step": max(steps), "before_bytes": before, "after_bytes": before,
                   "already_slim": True})
      continue
    tmp, old = ckpt + TMP_SUFFIX, ckpt + OLD_SUFFIX
    step = _write_slim(ckpt, tmp)
    storage._fsync_dir(tmp)
    os.rename(ckpt, old)
    os.rename(tmp, ckpt)
    storage._fsync_dir(os.path.dirname(ckpt))
    _keep_corrupt(old, ckpt)
    shutil.rmtree(old)
    rows.append({"phase": phase, "step": step, "before_bytes": before, "after_bytes": _size(ckpt),
                 "already_slim": False})
  return rows


def slim(workdir: str, *, out: str | None = None, in_place: bool = False, phase: str | None = None,
         allow_unfinished: bool = False) -> list[dict]:
  """Writes the run's weights-only checkpoints: into the new workdir `out` with the run's records, or `in_place`
  over the run's own checkpoints (see the module docstring). Returns one dict per phase: 'phase', 'step',
  'before_bytes', 'after_bytes' (the phase's checkpoint folder), 'already_slim'.

  Raises ValueError (`loader.UnfinishedRunError` for an unfinished run), FileNotFoundError (no such run or
  phase) or OSError (a non-empty `out`), `workdir_lock.WorkdirBusyError` when a launch holds the run."""
  if (out is None) == (not in_place):
    raise ValueError("give --out=DIR (a slim copy of the run) or --in_place (replace the run's own "
                     "checkpoints), one of the two.")
  if phase is not None and phase not in PHASES:
    raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES} or None (every phase).")
  _check_local(workdir, "--workdir")
  workdir = os.path.abspath(workdir)
  if not in_place:
    _check_local(out, "--out")
    out = os.path.abspath(out)
    if out == workdir or out.startswith(workdir + os.sep):
      raise ValueError(f"--out={out} lies in the run's workdir {workdir}; choose a folder outside it.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
      raise FileExistsError(f"--out={out} exists and is not an empty folder; choose a new folder "
                            f"(or remove that one).")
  _finished_or_refuse(workdir, in_place=in_place, allow_unfinished=allow_unfinished)
  phases = _phases(workdir, phase)
  if not in_place:
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
      return _slim_copy(workdir, out, phases)
    except BaseException:  # a half copy is no run: nothing left behind
      shutil.rmtree(out, ignore_errors=True)
      if not created:
        os.makedirs(out, exist_ok=True)
      raise
  from dtvit import workdir_lock
  with workdir_lock.hold(workdir):  # no launch may resume from (or write) these checkpoints meanwhile
    _finished_or_refuse(workdir, in_place=True, allow_unfinished=False)  # again, now that no launch can start
    return _slim_in_place(workdir, phases)


def _define_flags(values) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "a training run's --workdir", flag_values=values)
  flags.DEFINE_string("out", None, "write a slim copy of the run here: a new workdir (missing or empty folder)",
                      flag_values=values)
  flags.DEFINE_bool("in_place", False, "replace the finished run's own checkpoints with slim ones (it can then no "
                    "longer be resumed)", flag_values=values)
  flags.DEFINE_enum("phase", None, list(PHASES), "only this phase (default: every phase with checkpoints)",
                    flag_values=values)
  flags.DEFINE_bool("allow_unfinished", False, "with --out: copy a run that has not finished (its latest "
                    "checkpoints); without it such a run is refused", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)
  flags.register_multi_flags_validator(
      ["out", "in_place"], lambda v: bool(v["out"]) != bool(v["in_place"]),
      message="give --out=DIR (a slim copy of the run) or --in_place (replace its own checkpoints), one of the two",
      flag_values=values)


def _mb(n: int) -> str:
  return f"{n / 1e6:.2f} MB"


def main(argv=None) -> None:
  """`python -m dtvit.slim` with `argv` (without the program; None: sys.argv[1:]); a user's mistake prints one line
  and exits with status 1 (`loader.user_errors`), one in the command line with status 2 (`cli.parse`)."""
  from dtvit import cli
  from dtvit import loader
  from dtvit import workdir_lock
  args, _ = cli.parse("dtvit.slim", _define_flags, argv, doc="A trained run's weights (params, batch_stats) as "
                      "a small checkpoint without the optimizer state, usable by every command after training.")
  with loader.user_errors("dtvit.slim"):
    try:
      rows = slim(args.workdir, out=args.out, in_place=args.in_place, phase=args.phase,
                  allow_unfinished=args.allow_unfinished)
    except workdir_lock.WorkdirBusyError as e:  # its message names the holder and what to do
      print(f"error: dtvit.slim: {e}", file=sys.stderr)
      sys.exit(loader.USER_ERROR_EXIT_STATUS)
  for r in rows:
    if r["already_slim"]:
      print(f"{r['phase']}: step {r['step']}, already weights-only ({_mb(r['before_bytes'])}); nothing to do")
    else:
      print(f"{r['phase']}: step {r['step']}, checkpoints {_mb(r['before_bytes'])} -> {_mb(r['after_bytes'])}")
  print(f"slim: {os.path.abspath(args.out) if args.out else os.path.abspath(args.workdir)}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
