"""Checkpoints: the only module of dtvit that talks to Orbax.

One `Checkpointer` (one `ocp.CheckpointManager`) per checkpoint directory. Each step is saved as a composite of
two items:

  <dir>/<step>/state   the train state pytree (params, batch_stats, opt_state, step, ...), `StandardSave`
  <dir>/<step>/meta    a JSON dict (data iterator position, phase, config, ...), `JsonSave`

Orbax writes a step into `<dir>/<step>.orbax-checkpoint-tmp` and renames it to `<dir>/<step>` only when every
item is committed, so a crash mid-write leaves a tmp directory that is never listed as a step. `Checkpointer`
deletes such leftovers when it opens a directory; `restore_variables` (read-only) names them in its error.

A committed step can still be damaged later (a full disk, a truncated copy, files deleted by hand).
`Checkpointer.restore_latest` then moves the unreadable step to `<dir>/corrupt/<step>` (kept, never deleted),
logs one line naming it, and restores the step before it.

`restore_variables` loads a subset of a finished run's state (params, optionally batch_stats) into a new model:
the SNN phase starts from the ANN phase this way, and so does `init_from`. Whether a saved tree fits the target,
and which leaves start fresh, is decided without Orbax, in `dtvit.checkpoint_trees`.

A weights-only checkpoint (`dtvit.slim`: `read_weights` -> `write_weights`) holds only `WEIGHTS` (params,
batch_stats) of a step, its meta marked `"weights_only": true` with the collections it dropped. Everything that
reads weights reads it as it reads a full one (`restore_variables`); a resume, which needs the optimizer state,
stops with `WeightsOnlyCheckpointError` (`Checkpointer.restore`, and `check_resumable` before a launch writes).

The workdir's own records (config.json, summary.json) and the resume rules are in `dtvit.workdir`.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
from typing import Callable, Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging
from etils import epath  # Orbax's path library: the same checks work on local disk and gs://

from dtvit import checkpoint_trees
from dtvit.checkpoint_trees import CheckpointMismatch
from dtvit import sharding
from dtvit import workdir as workdir_lib

# Orbax's marker of an unfinished step directory (`<step>.orbax-checkpoint-tmp`); used only to explain errors.
_ORBAX_TMP_MARKER = '.orbax-checkpoint-tmp'

# Orbax WARNINGs that describe expected situations in how dtvit uses it, not problems.
_HARMLESS_ORBAX_WARNINGS = (
    'Given directory is read only',
    'read_only=True, setting',
)


class _QuietOrbaxFilter(std_logging.Filter):
  """Drops Orbax's INFO/DEBUG chatter (~80 lines per save+restore at absl's default verbosity) and a few known
  harmless warnings. Real warnings and errors pass. Set DTVIT_ORBAX_LOGS=1 to see everything."""

  silenced = False  # True while a restore is being tried: its failure is reported in one line of dtvit's own

  def filter(self, record: std_logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING or _QuietOrbaxFilter.silenced:
      return False
    message = record.getMessage()
    return not any(m in message for m in _HARMLESS_ORBAX_WARNINGS)


def _quiet_orbax_logs() -> None:
  if os.environ.get('DTVIT_ORBAX_LOGS') == '1':
    return
  # Orbax logs through absl, i.e. the 'absl' stdlib logger; a logger filter sees every record it emits.
  absl_logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _QuietOrbaxFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbaxFilter())


_quiet_orbax_logs()


@contextlib.contextmanager
def _orbax_silenced():
  _QuietOrbaxFilter.silenced = True
  try:
    yield
  finally:
    _QuietOrbaxFilter.silenced = False


class UnreadableCheckpointError(OSError):
  """Checkpoints that cannot be read although they were committed."""


# The collections a model needs (what a weights-only checkpoint keeps), and the meta key that marks one.
WEIGHTS = ('params', 'batch_stats')
WEIGHTS_ONLY = 'weights_only'


class WeightsOnlyCheckpointError(CheckpointMismatch):
  """A resume asked for the whole train state of a weights-only checkpoint (`dtvit.slim`); one line naming it
  and the fix."""


def _weights_only_error(directory: str, step: int, meta: dict) -> WeightsOnlyCheckpointError:
  dropped = ', '.join(meta.get('dropped') or ['opt_state'])
  successor = 'snn' if meta.get('phase') == 'ann' else 'finetune'  # a phase that starts from these weights
  return WeightsOnlyCheckpointError(
      f'{directory}/{step} is a weights-only checkpoint (written by dtvit.slim: the weights without the training '
      f'state {dropped}): a run cannot resume or continue training from it. Start a new run from its weights in '
      f'another workdir, with init_from of the phase that should start from them (e.g. '
      f'--config.{successor}.init_from={directory}); evaluate, predict, export, report and dtvit.load read it as '
      f'it is.')


def _abspath(directory: str) -> str:
  # Orbax wants absolute paths; leave URLs (gs://...) alone.
  return directory if '://' in directory else os.path.abspath(directory)


def _unfinished_writes(directory: str) -> list[str]:
  return sorted(p.name for p in epath.Path(directory).iterdir() if _ORBAX_TMP_MARKER in p.name)


def _no_checkpoint_error(directory: str, what: str) -> FileNotFoundError:
  unfinished = _unfinished_writes(directory)
  detail = (f'it holds only unfinished writes {unfinished} (a save was interrupted)' if unfinished
            else 'it is empty of checkpoint steps')
  return FileNotFoundError(
      f'{what}: {directory} holds no complete checkpoint: {detail}. Let the run that writes there save at least '
      f'one checkpoint, or point {what} at the checkpoint directory of a run that did.')


class Checkpointer:
  """Saves and restores (state, meta) per step in one directory; see the module docstring for the layout.

  Saves are asynchronous: `save` returns once arrays are copied off device, the write finishes in background
  threads; `wait` blocks until it is on disk. `latest_step` never reports a step still being written.
  Use as a context manager or call `close` so the last write completes before the process exits.

  A save without `force` happens every `save_interval_steps` steps and, with `save_first`, at the first save
  into an empty directory (Orbax's default); `max_to_keep` newest steps are kept. `extra_meta()`, when given,
  is called at each save and its dict merged into the step's meta (e.g. the training time so far).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               save_first: bool = True, extra_meta: Callable[[], dict] | None = None):
    self.directory = _abspath(directory)
    self.extra_meta = extra_meta
    # What Orbax makes of `save_interval_steps` by default, less its save on a JAX preemption notice: dtvit
    # handles preemption itself (SIGTERM, agreed across processes in `dtvit.train`) and saves with `force`.
    policies = [ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps)]
    if save_first:  # the first save into an empty directory happens whatever its step
      policies.append(ocp.checkpoint_managers.InitialSavePolicy())
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a killed run are garbage; they can be large
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
    )
    self._pending_step: int | None = None

  def latest_step(self) -> int | None:
    """The newest step whose write has finished, or None."""
    # Orbax lists a step as soon as its save starts; leave out the one still in flight.
    in_flight = self._pending_step if self._manager.is_saving_in_progress() else None
    steps = [s for s in self._manager.all_steps() if s != in_flight]
    return max(steps, default=None)

  def all_steps(self) -> list[int]:
    """Finished steps, oldest first."""
    in_flight = self._pending_step if self._manager.is_saving_in_progress() else None
    return sorted(s for s in self._manager.all_steps() if s != in_flight)

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would write: `step` is a multiple of `save_interval_steps`
    (or, with `save_first`, the first save into an empty directory) and newer than every saved step."""
    return self._manager.should_save(int(step))

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts saving `state` (pytree of arrays / scalars) and `meta` (JSON-able dict) as `step`.

    Returns whether a save was started: False when `should_save(step)` is False (unless `force`) or `step` is
    already saved (e.g. the step a run resumed from).
    """
    step = int(step)
    meta = workdir_lib.to_json({**meta, **(self.extra_meta() if self.extra_meta else {})})
    if step in self._manager.all_steps():
      logging.info('Checkpoint for step %d already in %s; not saving it again.', step, self.directory)
      return False
    started = self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    if started:
      self._pending_step = step
    return started

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta) of `step` (default: latest) into the structure, dtypes and shardings of
    `abstract_state` (jax.ShapeDtypeStruct leaves with `.sharding`, or concrete arrays).

    Leaves given without a sharding come back with the sharding they were saved with.
    Raises FileNotFoundError when there is no such checkpoint, ValueError when the saved tree does not fit
    (`WeightsOnlyCheckpointError` when it is a weights-only checkpoint that lacks collections asked for).
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise _no_checkpoint_error(self.directory, 'restore')
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; it has steps '
                              f'{self.all_steps()}.')
    saved_tree = self._manager.item_metadata(step)['state'].tree
    if isinstance(abstract_state, dict) and set(abstract_state) - set(saved_tree):
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      if meta.get(WEIGHTS_ONLY):
        raise _weights_only_error(self.directory, step, meta)
    checkpoint_trees.check_compatible(
        saved_tree, abstract_state, prefix='', source=f'checkpoint {self.directory}/{step}',
        fix='The code or config changed since this checkpoint was written; resume with the same ones, or start '
            'a fresh run in another workdir.')
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return restored.state, restored.meta

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, meta) of the newest readable step, as `restore`; None when no step is left.

    A committed step that cannot be read (truncated or deleted files) is moved to `<dir>/corrupt/<step>`, one
    warning line names it, and the step before it is tried. A second unreadable step raises
    `UnreadableCheckpointError` and moves nothing more: that is no longer one damaged checkpoint. A step that
    reads but holds another tree raises `CheckpointMismatch` (a weights-only one `WeightsOnlyCheckpointError`).
    A collective: every process calls it.
    """
    moved = None
    _hush_failed_restore_leftovers()
    while (step := self.latest_step()) is not None:
      try:
        with _orbax_silenced():
          restored, error = self.restore(abstract_state, step), None
      except CheckpointMismatch:
        raise
      except Exception as e:  # Orbax / TensorStore / JSON read errors
        restored, error = None, e
      if not sharding.any_process(error is not None):  # every process must agree on the step
        return restored
      reason = _short_reason(error) if error is not None else 'unreadable on another process'
      if moved is not None:
        raise UnreadableCheckpointError(
            f'Checkpoints {moved[0]} and {step} in {self.directory} are both unreadable ({reason}); that is '
            f'more than one damaged checkpoint. Step {moved[0]} was moved to {moved[1]}; check the disk and '
            f'the files, then rerun (or start afresh with --overwrite).')
      moved = (step, self._set_aside(step))
      logging.warning('Checkpoint step %d in %s is unreadable (%s); moved it to %s and resuming from the step '
                      'before it.', step, self.directory, reason, moved[1])
    return None

  def _set_aside(self, step: int) -> str:
    """Moves `<dir>/<step>` to `<dir>/corrupt/<step>` (`.1`, `.2`... if taken); returns where."""
    target = epath.Path(self.directory) / 'corrupt' / str(step)
    n = 0
    while target.exists():
      n += 1
      target = target.parent / f'{step}.{n}'
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'dtvit_checkpoint_aside_{step}')
    self._manager.reload()
    return str(target)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _short_reason(error: Exception) -> str:
  """'Type: first line of the message', without TensorStore's spec dump and chain of contexts (its first and
  last parts say what and why), at most ~300 characters."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  parts = text.split(' [tensorstore_spec=')[0].split(': ')
  text = ': '.join(parts if len(parts) <= 2 else [parts[0], '...', parts[-1]])
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def _is_leftover_of_failed_restore(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'


class _LeftoverFilter(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.exc_info and _is_leftover_of_failed_restore(record.exc_info[1])) and not (
        record.getMessage().startswith('Task exception was never retrieved'))


def _hush_failed_restore_leftovers() -> None:
  """A failed Orbax restore leaves TensorStore reads in flight; as they finish they call back into the
  restore's closed event loop, and each prints a traceback ('Event loop is closed', 'Task exception was never
  retrieved': dozens per checkpoint). The failure itself is reported in one line; these echoes are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, 'dtvit_hushed', False):
    return

  def hook(unraisable):
    if not _is_leftover_of_failed_restore(unraisable.exc_value):
      previous(unraisable)

  hook.dtvit_hushed = True
  sys.unraisablehook = hook
  std_logging.getLogger('asyncio').addFilter(_LeftoverFilter())


def check_source(directory: str, what: str) -> None:
  """Raises the errors `restore_variables` would (no directory, no finished step) without reading arrays."""
  directory = _abspath(directory)
  manager = _read_only_manager(directory, what)
  try:
    _finished_step(manager, directory, what, None)
  finally:
    manager.close()


def _read_only_manager(directory: str, what: str) -> ocp.CheckpointManager:
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(
        f'{what}: checkpoint directory {directory} does not exist. Point {what} at the checkpoint directory '
        f'written by an earlier run (the directory that holds numbered step folders).')
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      # PyTreeCheckpointHandler reads what StandardCheckpointHandler wrote and allows restoring a subtree.
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
  )


def _finished_step(manager: ocp.CheckpointManager, directory: str, what: str, step: int | None) -> int:
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise _no_checkpoint_error(directory, what)
  elif step not in manager.all_steps():
    raise FileNotFoundError(f'{what}: no checkpoint for step {step} in {directory}; it has steps '
                            f'{sorted(manager.all_steps())}.')
  return step


def restore_variables(directory: str, abstract_variables: dict[str, Any], *, what: str = 'init_from',
                      step: int | None = None, fresh: dict[str, Any] | Callable[[], dict] | None = None,
                      reinit_on_mismatch: Callable[[str], bool] | None = None) -> dict[str, Any]:
  """Restores only some collections of another run's checkpoint, e.g. {'params': ..., 'batch_stats': ...}.

  Args:
    directory: the other run's checkpoint directory (the one its `Checkpointer` wrote).
    abstract_variables: collection name -> pytree of jax.ShapeDtypeStruct (with `.sharding`) or arrays; the
      result has this structure, dtypes and shardings.
    what: how the caller names this source in errors and logs (a flag or config key, e.g. 'init_from').
    step: which step; default the latest finished one.
    fresh: concrete variables with the structure of `abstract_variables` (e.g. a fresh init), or a function
      returning them (called only when a leaf is re-initialised).
    reinit_on_mismatch: predicate on a leaf path ('params/blocks_0/attn/time_mask/time_scores'): such leaves
      whose saved shape differs from the target (e.g. time-step scores of another T_max) are taken from
      `fresh` instead of raising. Other mismatches still raise.

  Returns:
    dict with the same keys as `abstract_variables`, holding the saved values.

  Raises:
    FileNotFoundError: no directory, or no finished checkpoint in it.
    ValueError: a collection, key path, shape or dtype differs between checkpoint and target.
  """
  directory = _abspath(directory)
  manager = _read_only_manager(directory, what)
  try:
    step = _finished_step(manager, directory, what, step)
    saved_tree = manager.item_metadata(step)['state'].tree
    source = f'{what} checkpoint {directory}/{step}'
    fix = (f'Make the model config match the run that wrote {directory}, or point {what} at a checkpoint of '
           f'the same model.')
    reinit = checkpoint_trees.leaves_to_reinit(saved_tree, abstract_variables, fresh, reinit_on_mismatch)
    if reinit:
      logging.warning('%s: %s differ in shape from the checkpoint; they start fresh.', what, sorted(reinit))
      abstract_variables = checkpoint_trees.drop_paths(abstract_variables, reinit)
      saved_tree = checkpoint_trees.drop_paths(dict(saved_tree), reinit)
    for name, abstract in abstract_variables.items():
      if name not in saved_tree:
        raise CheckpointMismatch(f'Tree structure mismatch: {source} has no {name!r} collection (it has '
                                 f'{sorted(saved_tree)}). {fix}')
      checkpoint_trees.check_compatible(saved_tree[name], abstract, prefix=name, source=source, fix=fix)
    abstract = checkpoint_trees.with_default_sharding(dict(abstract_variables))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
  finally:
    manager.close()
  logging.info('%s: restored %s from %s step %d.', what, sorted(abstract_variables), directory, step)
  return checkpoint_trees.set_leaves(dict(restored.state), reinit)


def restore_params(directory: str, abstract_params: Any, *, what: str = 'init_from') -> Any:
  """`restore_variables` for the 'params' collection alone."""
  return restore_variables(directory, {'params': abstract_params}, what=what)['params']


# ------------------------------------------------------------------------------------------------------------
# Weights-only checkpoints (`dtvit.slim`).


def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def weights_only_steps(directory: str) -> dict[int, bool]:
  """{committed step: whether it is weights-only} of a checkpoint directory ({} when there is none)."""
  directory = _abspath(directory)
  if not epath.Path(directory).is_dir():
    return {}
  manager = _read_only_manager(directory, 'checkpoints')
  try:
    return {s: bool(_restore_meta(manager, s).get(WEIGHTS_ONLY)) for s in sorted(manager.all_steps())}
  finally:
    manager.close()


def check_resumable(directory: str) -> None:
  """Raises `WeightsOnlyCheckpointError` when the newest committed step of `directory` (the one a resume
  restores) is weights-only; reads only its meta. A missing directory, or a meta that cannot be read (the resume
  deals with a damaged step), passes."""
  directory = _abspath(directory)
  if not epath.Path(directory).is_dir():
    return
  manager = _read_only_manager(directory, 'checkpoints')
  try:
    step = manager.latest_step()
    if step is None:
      return
    try:
      with _orbax_silenced():
        meta = _restore_meta(manager, step)
    except Exception:  # a damaged step: `Checkpointer.restore_latest` moves it aside and says so
      return
  finally:
    manager.close()
  if meta.get(WEIGHTS_ONLY):
    raise _weights_only_error(directory, step, meta)


def read_weights(directory: str, step: int | None = None, *, what: str = 'checkpoint'
                 ) -> tuple[int, dict[str, Any], dict, list[str]]:
  """(step, {collection: arrays} of the `WEIGHTS` a step holds (those with arrays, on this process's first
  device, as saved), its meta, the other collections of its state) of `step` (default: the latest committed)."""
  directory = _abspath(directory)
  manager = _read_only_manager(directory, what)
  try:
    step = _finished_step(manager, directory, what, step)
    saved = manager.item_metadata(step)['state'].tree
    kept = [n for n in WEIGHTS if n in saved and jax.tree.leaves(saved[n])]
    abstract = checkpoint_trees.with_default_sharding(
        {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[n]) for n in kept})
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract), partial_restore=True),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return step, dict(restored.state), dict(restored.meta), sorted(set(saved) - set(kept))


def write_weights(directory: str, step: int, weights: dict[str, Any], meta: dict, dropped: list[str]) -> None:
  """Writes `weights` ({collection: arrays}) as checkpoint `step` of `directory` in the layout of `Checkpointer`,
  its meta `meta` marked weights-only (`WEIGHTS_ONLY`, and 'dropped': the collections left out, with those an
  earlier slim left out)."""
  dropped = sorted(set(dropped) | set(meta.get('dropped') or []))
  with Checkpointer(directory, max_to_keep=1) as ckpt:
    ckpt.save(step, weights, {**meta, WEIGHTS_ONLY: True, 'dropped': dropped}, force=True)
