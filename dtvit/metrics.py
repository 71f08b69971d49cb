"""Metric writing: TensorBoard event files plus log lines, hparams, a progress bar that log lines do not break,
a between-log-points averager and a throughput meter (steps/s, images/s, ETA), a phase's metric log (which
travels in its checkpoints) and a writer that does not rewrite the steps a resumed run's event files hold.

`MetricWriter` has the method names of `clu.metric_writers` (write_scalars / write_histograms / write_texts /
flush / close) so it can be swapped for clu's writer where TensorFlow is installed; clu's package
imports TensorFlow, which dtvit does not depend on, so this module writes events with tensorboardX instead.

`dtvit.events` reads event files back (for report.py and tests) without
TensorFlow.

On object storage (a `gs://` logdir) tensorboardX writes its event file into a local temporary folder, and each
flush uploads the whole file over `<logdir>/<its name>` (one upload: the object appears whole), at the latest
`UPLOAD_SECS` after a write and at `flush` / `close`. An object cannot be appended to, which is why: TensorBoard
reading the bucket sees the events up to the last upload.
"""
from __future__ import annotations

import logging as py_logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from dtvit import config_lib
from dtvit import events
from dtvit import storage

UPLOAD_SECS = 30.0  # an event file on object storage is uploaded at most this long after a write


def _is_main_process() -> bool:
  return jax.process_index() == 0


def _as_numpy(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _format_scalar(v: float) -> str:
  return f'{v:.6g}'


class MetricWriter:
  """Writes metrics to TensorBoard event files under `logdir` and to the log (absl INFO).

  Args:
    logdir: directory for event files; None means log only.
    just_logging: log only, write no files (e.g. on processes other than 0).
    prefix: if set, every tag becomes '<prefix>/<tag>' (e.g. 'train', 'eval'), in files and log lines.
  """

  def __init__(self, logdir: str | None, *, just_logging: bool = False, prefix: str = ''):
    self.logdir = logdir
    self.prefix = prefix
    self._tb = None
    self._local = None  # the local folder of an object-storage logdir's event file (module docstring)
    self._uploaded = 0.0
    if logdir is not None and not just_logging:
      # Imported here so processes that only log never touch tensorboardX.
      import tensorboardX
      if storage.is_url(logdir):
        storage.check(logdir, 'logdir')
        self._local = tempfile.mkdtemp(prefix='dtvit-events-')
        self._uploaded = time.monotonic()
      self._tb = tensorboardX.SummaryWriter(logdir=self._local or logdir, flush_secs=30)

  def _upload(self, force: bool = False) -> None:
    """Uploads the local event files to the object-storage logdir (every UPLOAD_SECS, or now with `force`)."""
    if self._local is None or not (force or time.monotonic() - self._uploaded > UPLOAD_SECS):
      return
    if self._tb is not None:
      self._tb.flush()
    for name in sorted(os.listdir(self._local)):
      storage.upload(os.path.join(self._local, name), storage.join(self.logdir, name))
    self._uploaded = time.monotonic()

  def _tag(self, key: str) -> str:
    return f'{self.prefix}/{key}' if self.prefix else key

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """scalars: tag -> Python number or 0-d (or size-1) array."""
    values = {self._tag(k): float(_as_numpy(v).reshape(())) for k, v in scalars.items()}
    logging.info('[%d] %s', step, ', '.join(f'{k}={_format_scalar(v)}' for k, v in values.items()))
    if self._tb is not None:
      for tag, value in values.items():
        self._tb.add_scalar(tag, value, global_step=step)
      self._upload()

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: int | None = None) -> None:
    """arrays: tag -> array of any shape; logged as min/mean/max, written as a TensorBoard histogram."""
    for key, value in arrays.items():
      tag, x = self._tag(key), _as_numpy(value).astype(np.float64).ravel()
      if x.size == 0:
        continue
      logging.info('[%d] %s: n=%d min=%s mean=%s max=%s', step, tag, x.size, _format_scalar(x.min()),
                   _format_scalar(x.mean()), _format_scalar(x.max()))
      if self._tb is not None:
        self._tb.add_histogram(tag, x, global_step=step, bins=num_buckets or 'tensorflow')

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for key, text in texts.items():
      tag = self._tag(key)
      logging.info('[%d] %s: %s', step, tag, text)
      if self._tb is not None:
        self._tb.add_text(tag, text, global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any], metrics: tuple[str, ...] = ()) -> None:
    """hparams: name -> bool, number or str (`flatten_hparams` of a config); written once per event file as
    TensorBoard's HParams plugin data, with `metrics` (tags) as the metrics its dashboard shows."""
    logging.info('hparams: %d values', len(hparams))
    if self._tb is not None:
      from tensorboardX import summary
      for proto in summary.hparams(dict(hparams), {self._tag(m): None for m in metrics}):
        self._tb.file_writer.add_summary(proto)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._upload(force=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self._upload(force=True)
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)
      self._local = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def create_default_writer(logdir: str | None, *, just_logging: bool | None = None, prefix: str = ''
                          ) -> MetricWriter:
  """A MetricWriter where only process 0 writes files (all processes log)."""
  if just_logging is None:
    just_logging = not _is_main_process()
  return MetricWriter(logdir, just_logging=just_logging, prefix=prefix)


def flatten_hparams(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A nested config (`config.to_dict()`) -> {'a.b.c': value} with values TensorBoard's hparams take: bools,
  numbers and strings as they are; None, tuples and anything else as their str()."""
  return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
          for name, value in config_lib.flatten(tree).items()}


class _LineWriter:
  """Stands in for a stream while a progress bar is drawn on it: each complete line goes out through
  `tqdm.write`, which clears the bar, prints the line and redraws the bar below it."""

  def __init__(self, original):
    self.original = original
    self._pending = ''

  def write(self, text: str) -> int:
    lines = (self._pending + text).split('\n')
    self._pending = lines.pop()
    for line in lines:
      tqdm.tqdm.write(line, file=self.original)
    return len(text)

  def flush(self) -> None:
    self.original.flush()

  def close_line(self) -> None:
    """Writes out a last line that has no newline yet."""
    if self._pending:
      tqdm.tqdm.write(self._pending, file=self.original)
      self._pending = ''

  def __getattr__(self, name):  # isatty, fileno, encoding...
    return getattr(self.original, name)


def _handler_streams(stream) -> list:
  """Log handlers writing to `stream`: the root's and absl's, and absl's inner Python handler."""
  handlers = logging.get_absl_logger().handlers + py_logging.getLogger().handlers
  handlers += [h.python_handler for h in handlers if isinstance(h, logging.ABSLHandler)]
  return [h for h in handlers if getattr(h, 'stream', None) is stream]


class _Bar(tqdm.tqdm):
  """A tqdm bar that, while open, routes what is written to its stream (log lines, warnings) through
  `tqdm.write`, so each such line comes out whole on its own line with the bar redrawn below it."""

  def __init__(self, *args, file, **kwargs):
    super().__init__(*args, file=file, **kwargs)
    self._swapped = []
    if not self.disable:
      self._line_writer = _LineWriter(file)
      self._swapped = [(h, file) for h in _handler_streams(file)]
      if sys.stderr is file:
        self._swapped.append((sys, file))
      for holder, _ in self._swapped:
        setattr(holder, 'stderr' if holder is sys else 'stream', self._line_writer)

  def close(self) -> None:
    swapped, self._swapped = getattr(self, '_swapped', []), []
    for holder, original in swapped:
      attr = 'stderr' if holder is sys else 'stream'
      if getattr(holder, attr) is self._line_writer:
        setattr(holder, attr, original)
    if swapped:
      self._line_writer.close_line()
    super().close()


def progress_bar(total: int, *, initial: int = 0, desc: str = '', disable: bool | None = None,
                 file=None) -> tqdm.tqdm:
  """A tqdm bar for a loop of `total` steps, starting at `initial` (for resumed runs), on `file` (default
  stderr). While it is open, log lines and anything else written to that stream print above it, each on its
  own line; `close()` puts the stream back.

  Never shown on processes other than 0. On process 0, `disable=None` shows it when stderr is a terminal, or
  when DTVIT_PROGRESS=1 (e.g. to see it in a redirected log); True/False force it off/on.
  """
  file = sys.stderr if file is None else file
  file = getattr(file, 'original', file) if isinstance(file, _LineWriter) else file  # a bar inside a bar
  if not _is_main_process():
    disable = True
  elif disable is None:
    disable = not (sys.stderr.isatty() or os.environ.get('DTVIT_PROGRESS') == '1')
  return _Bar(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True, file=file)


class Throughput:
  """Steps/s, images/s and the ETA of a loop, measured between two log points.

  `start(step)` when step `step` is done and training goes on (after the first step, so compilation is not
  counted, and after each log point's work); `pause()` / `resume()` around other work that is not training
  (periodic evaluation); `rates(step)` at a log point: {'steps_per_s', 'images_per_s', 'eta_s'} over the steps
  since `start`. The ETA is the remaining steps to `total` at that rate (evaluations not counted).
  """

  def __init__(self, total: int, batch_size: int, clock=time.perf_counter):
    self.total, self.batch_size, self._clock = total, batch_size, clock
    self._step, self._t0, self._paused_at, self._paused_s = None, 0.0, None, 0.0

  def start(self, step: int) -> None:
    self._step, self._t0, self._paused_s = step, self._clock(), 0.0

  def pause(self) -> None:
    self._paused_at = self._clock()

  def resume(self) -> None:
    if self._paused_at is not None:
      self._paused_s += self._clock() - self._paused_at
      self._paused_at = None

  def rates(self, step: int) -> dict[str, float]:
    """{} before `start` or when no step passed since."""
    if self._step is None or step <= self._step:
      return {}
    seconds = max(self._clock() - self._t0 - self._paused_s, 1e-9)
    steps_per_s = (step - self._step) / seconds
    return {'steps_per_s': steps_per_s, 'images_per_s': steps_per_s * self.batch_size,
            'eta_s': max(self.total - step, 0) / steps_per_s}


class Averager:
  """Weighted means of per-step metrics between two log points.

  `update` only stores references (device arrays stay on device and are not waited on), so calling it every
  step does not stall the jitted train loop; `result` fetches everything with one `jax.device_get`.
  Array values count as their mean; `weight` (number or scalar array, e.g. examples in the batch) applies to
  every metric of that update.
  """

  def __init__(self):
    self._entries: dict[str, list[tuple[Any, Any]]] = {}

  def update(self, metrics: Mapping[str, Any], weight: Any = 1) -> None:
    for key, value in metrics.items():
      self._entries.setdefault(key, []).append((value, weight))

  def result(self) -> dict[str, float]:
    """key -> weighted mean over the updates since the last reset (nan if its weights sum to 0)."""
    entries = jax.device_get(self._entries)
    out = {}
    for key, pairs in entries.items():
      values = np.array([np.mean(np.asarray(v, np.float64)) for v, _ in pairs])
      weights = np.array([float(np.asarray(w).reshape(())) for _, w in pairs])
      total = weights.sum()
      out[key] = float(np.dot(values, weights) / total) if total != 0 else float('nan')
    return out

  def reset(self) -> None:
    self._entries = {}

  def __len__(self) -> int:
    """Number of updates of the most-updated key since the last reset."""
    return max((len(p) for p in self._entries.values()), default=0)


class MetricLog:
  """A phase's metrics since the last log point and its logged history. Both travel in the checkpoint
  (`meta`), so a resumed run logs and summarises exactly what an uninterrupted one does. `meter` measures the
  throughput between log points (steps/s, images/s, ETA), written with the other scalars."""

  def __init__(self, writer, meta: dict, meter: Throughput | None = None):
    self.writer = writer
    self.meter = meter
    self.averager = Averager()
    self.since_log = list(meta.get('since_log', []))
    for m in self.since_log:
      self.averager.update(m)
    self.history = list(meta.get('history', []))

  def add(self, metrics: dict) -> None:
    self.averager.update(metrics)
    self.since_log.append(metrics)

  def write(self, step: int, extra: dict) -> None:
    scalars = self.averager.result()
    self.averager.reset()
    self.since_log = []
    scalars.update(extra)
    self.writer.write_scalars(step, scalars)
    self.history.append({'step': step, **{k: scalars.get(k, float('nan')) for k in ('loss', 'accuracy')}})

  def meta(self) -> dict:
    return {'since_log': jax.device_get(self.since_log), 'history': self.history}


class NoRewrites:
  """A metric writer that leaves out the values of steps its event files already hold for a tag, so a run
  resumed from a checkpoint older than its last log line adds no duplicate TensorBoard steps. (The resumed run
  recomputes those steps bitwise; after an allowed config change the first launch's values stay.)"""

  def __init__(self, writer, logdir: str):
    self._writer = writer
    self._last = {tag: max(s for s, _ in points) for tag, points in events.read_scalars(logdir).items()}

  def _tag(self, key: str) -> str:
    prefix = getattr(self._writer, 'prefix', '')
    return f'{prefix}/{key}' if prefix else key

  def write_scalars(self, step: int, scalars) -> None:
    new = {k: v for k, v in scalars.items() if step > self._last.get(self._tag(k), -1)}
    if new:
      self._writer.write_scalars(step, new)

  def __getattr__(self, name):
    return getattr(self._writer, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._writer.close()
