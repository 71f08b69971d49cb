"""One run per workdir: a lock that process 0 takes before it writes anything there and holds to the end.

Two launches on one workdir would both resume from the same checkpoints and overwrite each other's, so a second
launch stops at once with `WorkdirBusyError`, one line naming the holder (pid, host, start time) and what to do.

  with workdir_lock.hold(workdir):   # process 0 locks; the other processes of a multi-host run do not
    ...

A lock is an object with `acquire()` (raises WorkdirBusyError) and `release()`; `lock_for(workdir)` picks the
kind for the workdir's storage. A local folder has `LocalLock`: `flock` on `<workdir>/.lock`, which the kernel
drops when the holder dies, however it dies (SIGKILL, a crash, a lost machine), so a stale lock never blocks a
rerun; the file's content (pid, host, start) only names the holder in the message.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from absl import logging
import jax

LOCK_FILENAME = '.lock'


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message (one line) names it and what to do."""


def _holder(path: str) -> str:
  """'pid P on host H, started T' from the lock file, or a placeholder when it cannot be read."""
  try:
    with open(path) as f:
      info = json.load(f)
    return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return 'a process whose pid and host the lock file does not say'


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
        raise WorkdirBusyError(
            f'workdir {self.workdir} is in use by another run ({_holder(self.path)}); wait for it to end, or '
            f'stop it (SIGTERM checkpoints and exits) and rerun, or choose another --workdir.') from None
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


def lock_for(workdir: str) -> LocalLock:
  """The lock for `workdir`'s storage (local folders only, for now)."""
  return LocalLock(workdir)


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `workdir`'s lock (process 0 only) for the body; raises WorkdirBusyError when another run holds it.
  A workdir this call created that holds nothing but the lock at the end (a launch refused before writing) is
  removed again, so a refused launch leaves nothing behind."""
  if jax.process_index() != 0:
    yield
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
