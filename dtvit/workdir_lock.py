"""One run per workdir: a lock that process 0 takes before it writes anything there and holds to the end.

Two launches on one workdir would both resume from the same checkpoints and overwrite each other's, so a second
launch stops at once with `WorkdirBusyError`, one line naming the holder (pid, host, start time) and what to do.

  with workdir_lock.hold(workdir):   # process 0 locks; the other processes of a multi-host run do not
    ...

A lock is an object with `acquire()` (raises WorkdirBusyError) and `release()`; `lock_for(workdir)` picks the
kind for the workdir's storage. A local folder has `LocalLock`: `flock` on `<workdir>/.lock`, which the kernel
drops when the holder dies, however it dies (SIGKILL, a crash, a lost machine), so a stale lock never blocks a
rerun; the file's content (pid, host, start) only names the holder in the message.

Object storage (`gs://`) has no flock and nothing that drops a lock when its holder dies, so there `ObjectLock`
is the lock object `<workdir>/.lock` itself: created only where none exists (GCS's does-not-exist precondition,
`ifGenerationMatch=0`), holding pid, host, start, a random token and a heartbeat time that a background thread
renews every `lease_s / 4` seconds while the run lives; deleted at release. A lock whose heartbeat is older than
its lease (its holder was killed) is stale: the next launch deletes that generation of it (a conditional delete:
a lock another launch took meanwhile is a newer generation and stays) and takes its own. The lease
(`DTVIT_LOCK_LEASE_S`, default 120 s) bounds how long a killed run blocks its rerun; hosts' clocks must agree
to well within it. After its create the launch reads the lock back and keeps it only if the token is its own,
which also guards stores that ignore the precondition (the local GCS emulator does).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import jax

from dtvit import storage

LOCK_FILENAME = '.lock'
LEASE_ENV = 'DTVIT_LOCK_LEASE_S'
DEFAULT_LEASE_S = 120.0


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message (one line) names it and what to do."""


def _holder(path: str) -> str:
  """'pid P on host H, started T' from the lock file, or a placeholder when it cannot be read."""
  try:
    return _describe(json.loads(storage.read_bytes(path)))
  except (OSError, ValueError, KeyError, TypeError):
    return 'a process whose pid and host the lock file does not say'


def _describe(info: dict) -> str:
  return f"pid {info['pid']} on host {info['host']}, started {info['started']}"


def _busy(workdir: str, holder: str) -> WorkdirBusyError:
  return WorkdirBusyError(f'workdir {workdir} is in use by another run ({holder}); wait for it to end, or stop '
                          f'it (SIGTERM checkpoints and exits) and rerun, or choose another --workdir.')


class LocalLock:
  """`flock` on `<workdir>/.lock` (the workdir is created if missing); POSIX only (elsewhere: no lock, with
  one warning)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILENAME)
    self._fd = None

  def acquire(self) -> None:
    try:
      import fcntl  # POSIX only
    except ImportError:
      logging.warning('workdir %s: no file locks on this system; make sure no other run uses it.', self.workdir)
      return
    for _ in range(10):
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise _busy(self.workdir, _holder(self.path)) from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # its holder removed the file as we opened it (an empty workdir cleaned up): take a new one
    else:
      raise WorkdirBusyError(f'workdir {self.workdir}: its lock file {self.path} keeps being replaced; is '
                             f'another tool removing it?')
    os.ftruncate(fd, 0)
    record = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
    os.write(fd, (json.dumps(record) + '\n').encode())
    os.fsync(fd)
    self._fd = fd

  def release(self, *, remove: bool = False) -> None:
    """Drops the lock; `remove` deletes the lock file first (while still held, so no one waits on it)."""
    if self._fd is None:
      return
    if remove:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
    os.close(self._fd)  # closing the last descriptor drops the flock
    self._fd = None


class ObjectLock:
  """The lock object `<workdir>/.lock` on object storage (gs://), with a lease renewed while held; see the module
  docstring. `lease_s` (default $DTVIT_LOCK_LEASE_S, else 120 s): a lock not renewed for that long is stale."""

  def __init__(self, workdir: str, lease_s: float | None = None):
    storage.check(workdir, 'workdir')
    self.workdir = workdir.rstrip('/')
    self.path = storage.join(self.workdir, LOCK_FILENAME)
    self.lease_s = float(lease_s if lease_s is not None else os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))
    self._record = None
    self._stop = threading.Event()
    self._thread = None
    import fsspec
    # version_aware: 'bucket/key#generation' names one generation, so a delete is conditional on it.
    self._fs = fsspec.filesystem(storage.scheme(workdir), version_aware=True)
    self._key = self.path.split('://', 1)[1]

  def _read(self) -> tuple[dict | None, str | None]:
    """(the lock's record, its generation), (None, None) when there is none; an unreadable record is {}."""
    self._fs.invalidate_cache(self._key)
    try:
      generation = self._fs.info(self._key).get('generation')
      data = self._fs.cat_file(self._key)  # as new as `generation` or newer (then fresh: a busy lock)
    except FileNotFoundError:
      return None, None
    try:
      record = json.loads(data)
    except ValueError:
      record = {}
    return (record if isinstance(record, dict) else {}), generation

  def _write(self, record: dict, *, create: bool) -> None:
    data = (json.dumps(record) + '\n').encode()
    self._fs.pipe_file(self._key, data, mode='create' if create else 'overwrite')

  def acquire(self) -> None:
    for _ in range(5):
      record, generation = self._read()
      if record is not None:
        age = time.time() - float(record.get('heartbeat', 0) or 0)
        lease = float(record.get('lease_s', self.lease_s) or self.lease_s)
        if age <= lease:
          raise _busy(self.workdir, _describe(record) if 'pid' in record else
                      'a process whose pid and host the lock object does not say')
        logging.warning('workdir %s: its lock (%s) was not renewed for %.0f s, longer than its lease of %.0f s '
                        '(its run was killed); taking it over.', self.workdir,
                        _describe(record) if 'pid' in record else 'unreadable', age, lease)
        with contextlib.suppress(FileNotFoundError):  # another launch deleted or replaced it first
          self._fs.rm_file(f'{self._key}#{generation}' if generation else self._key)
      now = time.time()
      mine = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
              'token': uuid.uuid4().hex, 'heartbeat': now, 'lease_s': self.lease_s}
      try:
        self._write(mine, create=True)
      except FileExistsError:  # another launch created it between our read and our write
        continue
      time.sleep(0.5)  # a launch that raced ours past the existence check has written by now (see below)
      record, _ = self._read()
      if record is None or record.get('token') != mine['token']:
        # Our create was overwritten: a store that ignores the precondition and a launch as fast as ours.
        raise _busy(self.workdir, _describe(record) if record and 'pid' in record else 'another launch')
      self._record = mine
      self._stop.clear()
      self._thread = threading.Thread(target=self._heartbeat, name='dtvit-workdir-lock', daemon=True)
      self._thread.start()
      return
    raise WorkdirBusyError(f'workdir {self.workdir}: its lock object {self.path} keeps changing; is another tool '
                           f'writing it?')

  def _heartbeat(self) -> None:
    """Renews the heartbeat every lease/4 s while the lock is ours; stops (one warning) once it is not."""
    while not self._stop.wait(self.lease_s / 4):
      try:
        record, _ = self._read()
        if record is None or record.get('token') != self._record['token']:
          logging.warning('workdir %s: this run lost its lock (%s); another launch may be using the workdir.',
                          self.workdir, 'deleted' if record is None else f'now held by {_describe(record)}')
          return
        self._record = dict(self._record, heartbeat=time.time())
        self._write(self._record, create=False)
      except Exception as e:  # a network hiccup: the next beat tries again
        logging.warning('workdir %s: could not renew the lock (%s: %s); retrying.', self.workdir,
                        type(e).__name__, e)

  def release(self, *, remove: bool = True) -> None:
    """Stops the heartbeat and deletes the lock object if it is still ours (`remove` is implied: the object's
    existence is the lock)."""
    del remove
    if self._record is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
    record, generation = self._read()
    if record is not None and record.get('token') == self._record['token']:
      with contextlib.suppress(FileNotFoundError):
        self._fs.rm_file(f'{self._key}#{generation}' if generation else self._key)
    self._record = None


def lock_for(workdir: str) -> LocalLock | ObjectLock:
  """The lock for `workdir`'s storage: `ObjectLock` on object storage (gs://), else `LocalLock`."""
  return ObjectLock(workdir) if storage.is_url(workdir) else LocalLock(workdir)


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `workdir`'s lock (process 0 only) for the body; raises WorkdirBusyError when another run holds it.
  A workdir this call created that holds nothing but the lock at the end (a launch refused before writing) is
  removed again, so a refused launch leaves nothing behind."""
  if jax.process_index() != 0:
    yield
    return
  if storage.is_url(workdir):  # no folder to create or remove: the lock object comes and goes
    lock = lock_for(workdir)
    lock.acquire()
    try:
      yield
    finally:
      lock.release()
    return
  created = not os.path.exists(workdir)
  lock = lock_for(workdir)
  lock.acquire()
  try:
    yield
  finally:
    empty = created and os.path.isdir(workdir) and os.listdir(workdir) == [LOCK_FILENAME]
    lock.release(remove=empty)
    if empty:
      with contextlib.suppress(OSError):  # another launch may have taken the workdir meanwhile
        os.rmdir(workdir)
