"""Where dtvit's files live: one path layer for local folders and object storage (`gs://`, through `etils.epath`).

Every file dtvit reads or writes under a workdir, a sweep root or an export folder goes through these functions:
a local path stays a path on disk (with the same calls as before: `os`, `open`, an atomic rename), a URL such as
`gs://bucket/run` goes to `etils.epath` (and so to `gcsfs`, which Orbax's own paths also use). URLs are never
made absolute, joined to the current directory or created as folders, so no local folder named `gs:` appears.

Object storage has no folders and no rename: a "folder" is a name prefix that exists while an object under it
does, `makedirs` does nothing there, and a write is one upload, which appears whole or not at all (the atomic
write a rename gives on disk). See docs/cloud.md for what is and is not atomic there.

`gs://` needs `gcsfs`, the `gcs` install extra (`pip install 'dtvit[gcs]'`); without it, `check` raises
`MissingExtraError`, one line naming the extra, before anything is written.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator

# URL schemes and the package (install extra) each needs.
_EXTRAS = {'gs': ('gcsfs', 'gcs')}


class MissingExtraError(ValueError):
  """A URL whose storage needs a package that is not installed; the message (one line) names the extra."""


def is_url(path: str) -> bool:
  """Whether `path` names object storage (`gs://...`) rather than a local path."""
  return '://' in str(path)


def scheme(path: str) -> str:
  return str(path).split('://', 1)[0] if is_url(path) else ''


def check(path: str, what: str = 'path') -> None:
  """Raises MissingExtraError (one line) when `path`'s storage cannot be used here: a `gs://` URL without gcsfs,
  or a scheme dtvit does not know. Local paths always pass."""
  if not is_url(path):
    return
  name = scheme(path)
  if name not in _EXTRAS:
    raise MissingExtraError(f'{what}={path}: {name}:// is not a storage dtvit knows; give a local path or gs://.')
  package, extra = _EXTRAS[name]
  try:
    __import__(package)
  except ImportError:
    raise MissingExtraError(
        f"{what}={path}: {name}:// storage needs {package}, which is not installed: pip install 'dtvit[{extra}]' "
        f"(or pip install {package}).") from None


def epath_of(path: str):
  """`etils.epath.Path(path)` (after `check`)."""
  check(path)
  from etils import epath
  return epath.Path(path)


def _fs(path: str):
  """The fsspec filesystem of a URL, its listing cache dropped for `path` (Orbax and other processes write there
  behind its back, through tensorstore)."""
  check(path)
  import fsspec
  fs = fsspec.filesystem('gcs', finalize_on_close=True)  # the instance etils.epath uses (fsspec caches it)
  fs.invalidate_cache(_strip(path))
  return fs


def _strip(path: str) -> str:
  return str(path).split('://', 1)[1].rstrip('/')


def abspath(path: str) -> str:
  """`os.path.abspath` for a local path; a URL as it is (less a trailing '/')."""
  return str(path).rstrip('/') if is_url(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return posixpath.join(str(path), *parts) if is_url(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(str(path).rstrip('/')) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip('/')) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  return _fs(path).exists(_strip(path))


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  return _fs(path).isfile(_strip(path))


def isdir(path: str) -> bool:
  """A local folder; on object storage, a prefix with at least one object under it (or a bucket)."""
  if not is_url(path):
    return os.path.isdir(path)
  return _fs(path).isdir(_strip(path))


def listdir(path: str) -> list[str]:
  """The names directly under `path` (files and folders); [] for a missing folder or prefix."""
  if not is_url(path):
    return os.listdir(path) if os.path.isdir(path) else []
  fs = _fs(path)
  try:
    entries = fs.ls(_strip(path), detail=False)
  except FileNotFoundError:
    return []
  prefix = _strip(path)
  return sorted({posixpath.relpath(e.rstrip('/'), prefix) for e in entries if e.rstrip('/') != prefix})


def glob(folder: str, pattern: str) -> list[str]:
  """The paths directly under `folder` whose names match `pattern` (fnmatch), sorted."""
  return sorted(join(folder, n) for n in listdir(folder) if fnmatch.fnmatch(n, pattern))


def makedirs(path: str) -> None:
  """`os.makedirs(path, exist_ok=True)` locally; nothing on object storage (prefixes need no creating)."""
  if is_url(path):
    check(path)
    return
  os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Removes a file (an object); a missing one is no error."""
  if not is_url(path):
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    return
  with contextlib.suppress(FileNotFoundError):
    _fs(path).rm_file(_strip(path))


def rename(src: str, dst: str) -> None:
  """Moves a file or a folder. Local: `os.rename` (atomic). Object storage: a copy of every object, then the
  deletion of the originals (not atomic: see docs/cloud.md)."""
  if not is_url(src):
    os.rename(src, dst)
    return
  fs = _fs(src)
  fs.mv(_strip(src), _strip(dst), recursive=True)
  fs.invalidate_cache()


def open_file(path: str, mode: str = 'r', **kwargs) -> IO:
  """`open(path, mode)` locally; an epath file object on object storage (a write is uploaded at close)."""
  if not is_url(path):
    return open(path, mode, **kwargs)
  return epath_of(path).open(mode, **kwargs)


def read_bytes(path: str) -> bytes:
  with open_file(path, 'rb') as f:
    return f.read()


def _fsync_dir(directory: str) -> None:
  """Makes a rename in `directory` durable (where directories can be opened: not on Windows)."""
  try:
    fd = os.open(directory or '.', os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically and durably. Local: a temporary file, flushed to disk, renamed over
  `path`, then the folder flushed, so a crash or power loss leaves the old file or the new one, never a damaged
  one. Object storage: one upload, which replaces the object whole when it completes."""
  if is_url(path):
    epath_of(path).write_bytes(data)
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)  # readers never see a half-written file
  _fsync_dir(os.path.dirname(path))


def write_text(path: str, text: str) -> None:
  """`write_bytes` of `text` in UTF-8."""
  write_bytes(path, text.encode('utf-8'))


def upload(local: str, remote: str) -> None:
  """Copies the local file `local` to `remote` (a URL or a local path) in one write."""
  if not is_url(remote):
    shutil.copyfile(local, remote)
    return
  _fs(remote).put_file(local, _strip(remote))


@contextlib.contextmanager
def local_copy(path: str, suffix: str = '') -> Iterator[str]:
  """A local file name to write instead of `path` (for writers that take only local names, e.g. matplotlib or
  numpy): `path` itself on local disk; on object storage a temporary file, uploaded to `path` when the body ends
  without an error."""
  if not is_url(path):
    yield path
    return
  fd, tmp = tempfile.mkstemp(prefix='dtvit-', suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    upload(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
