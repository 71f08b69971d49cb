"""Reading TensorBoard event files back (the files `dtvit.metrics` writes), without TensorFlow: for
`dtvit.plots`, the metric log's de-duplication and tests."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from dtvit import storage


def _records(path: str) -> Iterator[bytes]:
  """Payloads of a TFRecord file (the event file container), checking both CRCs; stops at a torn tail."""
  from tensorboardX.record_writer import masked_crc32c
  with storage.open_file(path, 'rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,), (length_crc,) = struct.unpack('<Q', header[:8]), struct.unpack('<I', header[8:])
      if masked_crc32c(header[:8]) != length_crc:
        raise ValueError(f'{path}: corrupt record header')
      data, footer = f.read(length), f.read(4)
      if len(data) < length or len(footer) < 4:
        return  # the writer is still appending this record
      if masked_crc32c(data) != struct.unpack('<I', footer)[0]:
        raise ValueError(f'{path}: corrupt record payload')
      yield data


def read_events(logdir: str) -> Iterator[Any]:
  """Every event (tensorboardX `event_pb2.Event` proto) in the event files directly under `logdir`."""
  from tensorboardX.proto import event_pb2
  for path in storage.glob(logdir, 'events.out.tfevents.*'):
    for record in _records(path):
      yield event_pb2.Event.FromString(record)


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalars in the event files directly under `logdir`: tag -> [(step, value), ...] in file order."""
  out: dict[str, list[tuple[int, float]]] = {}
  for event in read_events(logdir):
    if event.HasField('summary'):
      for value in event.summary.value:
        if value.HasField('simple_value'):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def read_curves(logdir: str, tags: tuple[str, ...] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Scalars of the event files under `logdir` as curves: tag -> (steps int64 [N], values float64 [N]), sorted
  by step, one value per step (the last one written: a resumed run may write a step again). `tags`: only
  these (those present)."""
  curves = {}
  for tag, points in read_scalars(logdir).items():
    if tags is not None and tag not in tags:
      continue
    by_step = dict(points)
    steps_N = np.array(sorted(by_step), np.int64)
    curves[tag] = (steps_N, np.array([by_step[s] for s in steps_N], np.float64))
  return curves
