"""The records of a run in its workdir, and the rules for resuming into one.

  <workdir>/config.json           the run's config, written once the config, data and model checks pass
  <workdir>/config_history.json   one entry per launch that trained: time, the steps it resumed from, the keys
                                  it changed (process 0)
  <workdir>/summary.json          the run's results, written at the end (process 0)
  <workdir>/<phase>/              each phase's checkpoints (`dtvit.checkpointing`) and metrics

A launch into a workdir that holds a run (`plan_launch`) compares the configs:
- keys that change how a run is watched or stored, never what it computes, may differ freely
  (`RESUME_NEUTRAL_KEYS`: the logging, evaluation and checkpoint cadences, how batches are prepared);
- `<phase>.train_steps` may grow, to extend a phase that no later phase has started from: the phase's
  schedules (learning-rate warmup/cosine, mask temperature) are recomputed for the new length and followed from
  the resume step on, so the steps already run keep the old schedule (the history says so);
- `<phase>.nonfinite` may go from 'error' to 'skip': a run under 'error' had only finite steps;
- every `<phase>.*` key of a phase that has no checkpoint in the workdir yet (it has computed nothing), e.g. the
  SNN settings of a run whose ANN phase is still training;
- any other key only when named in `allow_changes` (`--allow_changes=key,...`; a key names its subtree too);
  the change is kept in config_history.json.
`record_launch` then writes config.json and the history entry. The records are written atomically and durably
(`write_json`: on disk a temporary file flushed to disk, then a rename, then the folder flushed; on object storage
one upload, `dtvit.storage`), so a reader never sees half a file, even after a crash. A record that cannot be
parsed anyway (`read_json`) stops the launch with one line naming the file; `--overwrite` moves such a run aside
without reading it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from dtvit import config_lib
from dtvit import storage
from dtvit import workdir_lock

# The config sections that are training phases, in the order they can run.
PHASES = ('ann', 'snn', 'finetune')

# Dotted keys that may change between a run and its resume: they change how the run is watched (log and eval
# cadence, the split evaluated during training), stored (checkpoint cadence and count), fed (threads preparing
# the same batches), paced (how often the host reads the steps' flags) or given up (how many skipped steps in a
# row stop it), never a value it computes. Keep this
# set short: every key added here is a way to resume into a silently different run.
RESUME_NEUTRAL_KEYS = frozenset(
    {f'{p}.{k}' for p in PHASES for k in ('log_every', 'eval_every', 'checkpoint_every', 'max_to_keep',
                                           'sync_every', 'max_consecutive_skips')}
    | {'data.num_threads', 'data.prefetch', 'data.periodic_eval_split'})

# Config keys that hold a checkpoint path. config.json stores one that lies beside the workdir (under its parent
# folder: a sweep's root) from the workdir, as '{workdir}/../ann/ann/checkpoints', so a committed record holds no
# path of the machine it ran on; `read_config` resolves it against the workdir again.
PATH_KEYS = tuple(f'{p}.{k}' for p in PHASES for k in ('init_from', 'distill_from'))
WORKDIR = '{workdir}'

CONFIG_FILENAME = 'config.json'
HISTORY_FILENAME = 'config_history.json'
SUMMARY_FILENAME = 'summary.json'


def checkpoint_dir(workdir: str, phase: str) -> str:
  return storage.join(workdir, phase, 'checkpoints')


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f'{type(x).__name__} is not JSON-serialisable')


def to_json(record: dict) -> dict:
  """`record` as plain JSON values (numpy scalars and arrays converted); a TypeError names what is not."""
  try:
    return json.loads(json.dumps(record, default=_json_default))
  except (TypeError, ValueError) as e:
    raise TypeError(f'A record must be JSON-serialisable (numpy scalars/arrays are converted): {e}') from e


_fsync_dir = storage._fsync_dir


def write_json(path: str, record: Any, *, sort_keys: bool = False, default=_json_default) -> None:
  """Writes `record` to `path` atomically and durably (`storage.write_text`): on disk a temporary file, flushed
  to disk, renamed over `path`, then the folder flushed, so a crash or power loss leaves the old file or the new
  one, never a damaged one; on object storage one upload, which replaces the object whole."""
  storage.write_text(path, json.dumps(record, indent=2, sort_keys=sort_keys, default=default) + '\n')


class DamagedRecordError(ValueError):
  """A JSON record that dtvit reads (config.json, summary.json, ...) cannot be parsed; the message names the
  file and the fix."""


def read_json(path: str, default: Any = None, *, expect: type | None = None, fix: str | None = None) -> Any:
  """The JSON record at `path`, or `default` when there is none. A record that cannot be read as JSON (empty,
  truncated, garbled, not text), or is not an `expect` (e.g. dict), raises DamagedRecordError naming the file and
  `fix` (default: move the workdir aside, or rerun training with --overwrite, which moves it aside unread)."""
  if not storage.exists(path):
    return default
  text = None
  try:
    text = storage.read_bytes(path).decode('utf-8')
    record = json.loads(text)
    if expect is not None and not isinstance(record, expect):
      raise ValueError(f'a JSON {type(record).__name__} where a {expect.__name__} belongs')
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (not text), the wrong type
    if text is not None and not text.strip():
      why = 'empty'
    elif text is None:
      why = 'not UTF-8 text'
    else:
      why = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    folder, name = storage.dirname(path), storage.basename(path)
    fix = fix or ('move the workdir aside, or rerun training there with --overwrite (which moves the run aside '
                  'without reading it)')
    raise DamagedRecordError(f'workdir {folder or "."}: {name} is damaged ({why}); {fix}.') from e
  return record


def _map_paths(config: dict, fn) -> dict:
  """A copy of `config` (nested dict) with fn(value) for each local path (not '', not a URL) of `PATH_KEYS`."""
  out = dict(config)
  for key in PATH_KEYS:
    section, leaf = key.split('.')
    value = out.get(section, {}).get(leaf) if isinstance(out.get(section), dict) else None
    if isinstance(value, str) and value and '://' not in value:
      out[section] = {**out[section], leaf: fn(value)}
  return out


def absolute_paths(config: dict, workdir: str) -> dict:
  """`config` with its `PATH_KEYS` absolute: '{workdir}/...' (as config.json stores a path beside the workdir)
  resolved against `workdir`, another relative path against the current directory (where it was given)."""
  if storage.is_url(workdir):  # '{workdir}/..' of a bucket: normalised as a URL path
    scheme, _, rest = workdir.rstrip('/').partition('://')
    at = lambda v: f'{scheme}://{posixpath.normpath(rest + v[len(WORKDIR):])}'  # noqa: E731
  else:
    here = os.path.abspath(workdir)
    at = lambda v: os.path.normpath(here + v[len(WORKDIR):])  # noqa: E731
  return _map_paths(config, lambda v: at(v) if v.startswith(WORKDIR) else os.path.abspath(v))


def relative_paths(config: dict, workdir: str) -> dict:
  """`config` as config.json stores it: a path of `PATH_KEYS` under the workdir's parent folder written from the
  workdir ('{workdir}/../ann/ann/checkpoints'), any other as it is (a bucket's paths are URLs, kept)."""
  if storage.is_url(workdir):
    return config
  here = os.path.abspath(workdir)
  parent = os.path.dirname(here)
  beside = lambda v: os.path.isabs(v) and (v + os.sep).startswith(parent + os.sep)  # noqa: E731
  return _map_paths(config, lambda v: f'{WORKDIR}/{os.path.relpath(v, here)}' if beside(v) else v)


def read_config(workdir: str) -> dict | None:
  """`<workdir>/config.json` under today's names (`config_lib.upgrade`), its paths absolute; None when absent."""
  saved = read_json(storage.join(workdir, CONFIG_FILENAME), expect=dict)
  return None if saved is None else absolute_paths(config_lib.upgrade(saved), workdir)


def write_summary(workdir: str, summary: dict) -> None:
  """Writes `<workdir>/summary.json` (process 0 only)."""
  if jax.process_index() == 0:
    write_json(storage.join(workdir, SUMMARY_FILENAME), summary)


_ABSENT = '<absent>'


def config_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, current value)} for every leaf that differs; a missing side is '<absent>'."""
  saved_flat, current_flat = config_lib.flatten(saved), config_lib.flatten(current)
  diffs = {}
  for key in sorted(set(saved_flat) | set(current_flat)):
    old, new = saved_flat.get(key, _ABSENT), current_flat.get(key, _ABSENT)
    if old != new:
      diffs[key] = (old, new)
  return diffs


def checkpoint_steps(workdir: str, phases) -> dict[str, int]:
  """{phase: its newest committed checkpoint step} for the phases that have one."""
  out = {}
  for phase in phases:
    steps = committed_steps(checkpoint_dir(workdir, phase))
    if steps:
      out[phase] = max(steps)
  return out


# Orbax's marker of a finished step on object storage, where a step is written in place (no rename commits it).
_COMMIT_MARKER = 'commit_success.txt'


def committed_steps(directory: str) -> list[int]:
  """The finished checkpoint steps in a checkpoint directory, oldest first (without Orbax: readers stay light).
  On disk a step folder is named only once committed (Orbax renames it from a tmp name); on object storage
  Orbax writes the step in place and marks it committed with `commit_success.txt`."""
  steps = sorted(int(n) for n in storage.listdir(directory) if n.isdigit())
  if storage.is_url(directory):
    steps = [s for s in steps if storage.exists(storage.join(directory, str(s), _COMMIT_MARKER))]
  return steps


def _phases(config: dict) -> list[str]:
  return [p.strip() for p in str(config.get('phases', '')).split(',') if p.strip()]


def _judge(key: str, old: Any, new: Any, config: dict, started: dict[str, int],
           defaults: dict) -> tuple[bool, str]:
  """(whether the change is free on resume, why / what it means)."""
  if key in RESUME_NEUTRAL_KEYS:
    return True, ''
  if old is _ABSENT and key in defaults and to_json({'v': defaults[key]})['v'] == new:
    return True, f'{key} is newer than the run and at its default ({_fmt(new)}), which is what the run did'
  section, _, leaf = key.partition('.')
  if section not in PHASES:
    return False, ''
  if section not in started:
    return True, ''  # a phase with no checkpoint here has computed nothing yet: its settings are free
  if leaf == 'nonfinite' and (old, new) == ('error', 'skip'):
    return True, ''
  if leaf == 'train_steps' and isinstance(old, int) and isinstance(new, int) and new > old:
    phases = _phases(config)
    later = [p for p in phases[phases.index(section) + 1:] if p in started] if section in phases else []
    if later:
      return False, f'{later[0]} already started from the {old}-step {section}'
    return True, (f'{section} extended from {old} to {new} steps: its learning-rate and mask-temperature '
                  f'schedules are recomputed for {new} steps and followed from step {started.get(section, 0)} '
                  f'on')
  return False, ''


@dataclasses.dataclass(frozen=True)
class Launch:
  """What a launch into a workdir will do, decided by `plan_launch` before anything is written."""
  workdir: str
  config: dict                          # the config as JSON
  earlier: bool                         # the workdir holds a run (config.json) that this launch continues
  overwrite: bool                       # move that run aside first
  changes: dict = dataclasses.field(default_factory=dict)   # key -> (saved, now): every differing key
  allowed: tuple[str, ...] = ()         # the changed keys that needed `allow_changes`
  notes: tuple[str, ...] = ()           # what the free changes mean (an extension's schedules)
  resumed_from: dict = dataclasses.field(default_factory=dict)  # phase -> its newest checkpoint step


def _fmt(v: Any) -> str:
  return v if v is _ABSENT else json.dumps(v)


def _refuse_other_config(workdir: str, refused: dict[str, tuple[Any, Any, str]]) -> ValueError:
  lines = [f'{k}: saved {_fmt(old)}, now {_fmt(new)}' + (f' ({why})' if why else '')
           for k, (old, new, why) in refused.items()]
  shown = '\n  '.join(lines[:10]) + (f'\n  ... and {len(lines) - 10} more' if len(lines) > 10 else '')
  return ValueError(
      f'Workdir {workdir} holds a run with a different config; resuming it would mix two experiments. '
      f'Changed keys:\n  {shown}\nTo resume with these changes (kept in {HISTORY_FILENAME}), add '
      f'--allow_changes={",".join(refused)} (train.run(..., allow_changes=...)); to start afresh, --overwrite '
      f'moves that run aside; or choose another --workdir.')


def _check_allow_keys(allow_changes, saved: dict, current: dict) -> tuple[str, ...]:
  keys = set(config_lib.flatten(saved)) | set(config_lib.flatten(current))
  allow = tuple(config_lib.renamed(a.strip())[0] for a in allow_changes if a.strip())
  for a in allow:
    if not any(k == a or k.startswith(a + '.') for k in keys):
      raise ValueError(f'allow_changes names {a!r}, which is not a config key; give dotted keys such as '
                       f'snn.optimizer.lr.')
  return allow


def plan_launch(workdir: str, config_dict: dict, *, overwrite: bool = False, allow_changes=(),
                defaults: dict | None = None) -> Launch:
  """Decides whether a run with `config_dict` may use `workdir`; reads, never writes (see `record_launch`).

  - No earlier run (no <workdir>/config.json), or `overwrite`: a fresh run.
  - An earlier run: every changed key must be free on resume (module docstring) or covered by
    `allow_changes` (dotted keys, each also naming its subtree); else ValueError naming each refused key and
    the fix.
  - `defaults` ({dotted key: value}, e.g. the base config's): a key the saved run lacks (added to dtvit
    since) is free when it holds its default, the value that keeps what older code did.
  """
  config = absolute_paths(to_json(config_dict), workdir)
  path = storage.join(workdir, CONFIG_FILENAME)
  if overwrite:  # moved aside unread: a damaged run must not stop its own replacement
    return Launch(workdir, config, earlier=storage.exists(path), overwrite=True)
  saved = read_config(workdir)  # a run recorded under older names resumes under today's
  if saved is None:
    return Launch(workdir, config, earlier=False, overwrite=False)
  allow = _check_allow_keys(allow_changes, saved, config)
  started = checkpoint_steps(workdir, PHASES)
  changes = config_differences(saved, config)
  refused, allowed, notes = {}, [], []
  for key, (old, new) in changes.items():
    free, why = _judge(key, old, new, config, started, defaults or {})
    if free:
      notes += [why] if why else []
    elif any(key == a or key.startswith(a + '.') for a in allow):
      allowed.append(key)
    else:
      refused[key] = (old, new, why)
  if refused:
    raise _refuse_other_config(workdir, refused)
  return Launch(workdir, config, earlier=True, overwrite=False, changes=changes, allowed=tuple(allowed),
                notes=tuple(notes), resumed_from=started)


def finished_summary(launch: Launch) -> dict | None:
  """The earlier run's summary when it already ran every phase of `launch.config` to its end, else None."""
  if not launch.earlier or launch.overwrite:
    return None
  summary = read_json(storage.join(launch.workdir, SUMMARY_FILENAME), expect=dict)
  phases = _phases(launch.config)
  if summary is None or summary.get('phases') != phases:
    return None
  done = all(summary.get(p, {}).get('steps', -1) >= launch.config[p]['train_steps'] for p in phases)
  return summary if done else None


def _move_aside(workdir: str) -> str:
  """Moves everything in `workdir` but its lock (`dtvit.workdir_lock`, held by this launch) to a new folder beside
  it, `<workdir>.old-<time>`, without reading any of it; returns that folder."""
  old = f'{workdir.rstrip(os.sep).rstrip("/")}.old-{time.strftime("%Y%m%d-%H%M%S")}'
  n = 1
  while storage.exists(old):
    old, n = f'{old.rsplit("~", 1)[0]}~{n}', n + 1
  storage.makedirs(old)
  for name in storage.listdir(workdir):
    if name != workdir_lock.LOCK_FILENAME:
      storage.rename(storage.join(workdir, name), storage.join(old, name))
  if not storage.is_url(workdir):
    _fsync_dir(old)
    _fsync_dir(workdir)
  logging.warning('overwrite: moved the earlier run in %s to %s; starting fresh.', workdir, old)
  return old


def record_launch(launch: Launch) -> None:
  """Writes what `launch` decided (process 0 only): moves an overwritten run aside, writes config.json, and
  appends the launch to config_history.json ({'time', 'resumed_from', 'changes', 'allowed', 'notes'})."""
  if jax.process_index() != 0:
    return
  entry: dict[str, Any] = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
  if launch.overwrite and launch.earlier:
    entry['moved_aside'] = _move_aside(launch.workdir)
  storage.makedirs(launch.workdir)
  write_json(storage.join(launch.workdir, CONFIG_FILENAME), relative_paths(launch.config, launch.workdir),
             sort_keys=True)
  path = storage.join(launch.workdir, HISTORY_FILENAME)
  history = read_json(path, default=[], expect=list)
  entry.update(launch=len(history) + 1, resumed_from=launch.resumed_from if launch.earlier else {},
               changes={k: {'from': old, 'to': new} for k, (old, new) in launch.changes.items()},
               allowed=list(launch.allowed), notes=list(launch.notes))
  for note in launch.notes:
    logging.info('resume: %s', note)
  if launch.allowed:
    logging.warning('resume with changed keys (allowed): %s', ', '.join(
        f'{k} {_fmt(launch.changes[k][0])} -> {_fmt(launch.changes[k][1])}' for k in launch.allowed))
  write_json(path, history + [entry])
