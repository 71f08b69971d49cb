"""The records of a run in its workdir, and the rules for resuming into one.

  <workdir>/config.json    the run's config, written before the first step (process 0)
  <workdir>/summary.json   the run's results, written at the end (process 0)
  <workdir>/<phase>/       each phase's checkpoints (`dtvit.checkpointing`) and metrics

`check_workdir` stops a run from resuming into a workdir that holds a run with another config: only the keys in
`RESUME_NEUTRAL_KEYS` may differ. Both records are written atomically (a temporary file, then a rename), so a
reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

# Config keys (last component of the dotted key, at any depth) that may change between a run and its resume
# without making the saved checkpoints wrong: extending training, logging / eval / checkpoint cadence.
# Everything else (model, data, optimizer, seeds, phase) must match. Keep this list short: every key added here
# is a way to resume into a silently different experiment.
RESUME_NEUTRAL_KEYS = frozenset({
    'total_steps',
    'num_train_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
})

CONFIG_FILENAME = 'config.json'
SUMMARY_FILENAME = 'summary.json'


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


def _write_json(path: str, record: dict, *, sort_keys: bool = False) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=sort_keys, default=_json_default)
    f.write('\n')
  os.replace(tmp, path)  # readers never see a half-written file


def write_summary(workdir: str, summary: dict) -> None:
  """Writes `<workdir>/summary.json` (process 0 only)."""
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, SUMMARY_FILENAME), summary)


def _flatten_config(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, dict) and d:
    out = {}
    for k, v in d.items():
      out.update(_flatten_config(v, f'{prefix}.{k}' if prefix else str(k)))
    return out
  return {prefix: d}


def config_differences(saved: dict, current: dict) -> list[str]:
  """'key: saved X, now Y' for every dotted key whose value differs, except the resume-neutral ones."""
  saved_flat, current_flat = _flatten_config(saved), _flatten_config(current)
  missing = object()
  diffs = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key.rsplit('.', 1)[-1] in RESUME_NEUTRAL_KEYS:
      continue
    old, new = saved_flat.get(key, missing), current_flat.get(key, missing)
    if old != new:
      fmt = lambda v: '<absent>' if v is missing else json.dumps(v)  # noqa: E731
      diffs.append(f'{key}: saved {fmt(old)}, now {fmt(new)}')
  return diffs


def _move_aside(workdir: str) -> None:
  old = f'{workdir.rstrip(os.sep)}.old-{time.strftime("%Y%m%d-%H%M%S")}'
  n = 1
  while os.path.exists(old):
    old, n = f'{old.rsplit("~", 1)[0]}~{n}', n + 1
  os.rename(workdir, old)
  logging.warning('overwrite: moved the earlier run in %s to %s; starting fresh.', workdir, old)


def _refuse_other_config(workdir: str, diffs: list[str]) -> ValueError:
  shown = '\n  '.join(diffs[:10]) + (f'\n  ... and {len(diffs) - 10} more' if len(diffs) > 10 else '')
  return ValueError(
      f'Workdir {workdir} holds a run with a different config; resuming it would mix two experiments. '
      f'Differing keys:\n  {shown}\nPass --overwrite (overwrite=True) to move that run aside and start '
      f'fresh, or choose another --workdir.')


def check_workdir(workdir: str, config_dict: dict, *, overwrite: bool = False) -> None:
  """Makes sure `workdir` is safe to (re)use for a run with `config_dict`, and records the config there.

  - No earlier run (no <workdir>/config.json): writes it.
  - Earlier run with the same config, up to RESUME_NEUTRAL_KEYS: the run resumes; config.json is updated.
  - Earlier run with a different config: ValueError naming the differing keys, unless `overwrite`.
  - `overwrite=True` and an earlier run: its workdir is renamed to <workdir>.old-<timestamp> (nothing is
    deleted) and the run starts fresh, even when the configs match.

  Only process 0 writes; other processes check only.
  """
  config = to_json(config_dict)
  path = os.path.join(workdir, CONFIG_FILENAME)
  writer = jax.process_index() == 0
  if os.path.exists(path):
    if overwrite:
      if writer:
        _move_aside(workdir)
    else:
      with open(path) as f:
        saved = json.load(f)
      diffs = config_differences(saved, config)
      if diffs:
        raise _refuse_other_config(workdir, diffs)
      if saved == config:
        return
  if writer:
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, config, sort_keys=True)
