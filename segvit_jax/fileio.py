"""Paths that are local folders or cloud buckets (`gs://bucket/run`, the TPU-pod workdir).

Local paths go through the standard library; URLs (anything with `://`) through `tf.io.gfile`,
which TensorFlow ships with GCS support. Orbax and TensorBoard writers take URLs by themselves;
these helpers cover the files the trainer writes itself (metrics.jsonl, JSON summaries, PNGs)
and the checks for existing checkpoints.

Writes that fail (a full disk, an I/O error) raise `StorageError`, one line naming the path, the
reason and the space left, and leave no partial file: `replace_file` writes a file whole or
leaves the old one, `AppendFile` appends a record whole or not at all.
"""

import builtins
import os
import re
import shutil
from typing import IO, Optional, Union

from segvit_jax.errors import StorageError


def is_url(path: str) -> bool:
  return '://' in str(path)


def _gfile():
  from segvit_jax import errors  # pylint: disable=g-import-not-at-top
  return errors.import_tensorflow_module('tensorflow', 'A gs:// or other URL path').io.gfile


def absolute(path: str) -> str:
  """`os.path.abspath` for local paths; URLs unchanged (abspath would turn gs://b into ./gs:/b)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  if is_url(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names (no trailing slashes), [] when `path` is not a folder."""
  if not isdir(path):
    return []
  if is_url(path):
    return [name.rstrip('/') for name in _gfile().listdir(path)]
  return os.listdir(path)


def rename(source: str, target: str) -> None:
  if is_url(source):
    _gfile().rename(source, target)
  else:
    os.rename(source, target)


def open_file(path: str, mode: str = 'r') -> IO:
  """A file object; text modes read and write UTF-8."""
  if is_url(path):
    return _gfile().GFile(path, mode)
  if 'b' in mode:
    return builtins.open(path, mode)
  return builtins.open(path, mode, encoding='utf-8')


# ------------------------------------------------------------------------------------------------
# Failed writes.

# TensorStore (Orbax's array writer) reports an OS error as a status message ending in
# "[os_error_code='28']" rather than as an OSError.
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
# The canonical status codes TensorStore prefixes its I/O failures with.
_STATUS = re.compile(r'^(RESOURCE_EXHAUSTED|UNKNOWN|DATA_LOSS|PERMISSION_DENIED|UNAVAILABLE|'
                     r'INTERNAL|FAILED_PRECONDITION|ABORTED|DEADLINE_EXCEEDED|NOT_FOUND|'
                     r'OUT_OF_RANGE|INVALID_ARGUMENT): ')


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def io_failure(error: BaseException) -> Optional[str]:
  """The reason of a failed read or write ('No space left on device'), from an OSError or a
  TensorStore status anywhere in `error`'s chain; None when `error` is no I/O failure (a bug)."""
  for e in _chain(error):
    if isinstance(e, OSError):
      return e.strerror or str(e) or type(e).__name__
    code = _OS_ERROR_CODE.search(str(e))
    if code:
      return os.strerror(int(code.group(1)))
    status = _STATUS.match(str(e))
    if status and isinstance(e, ValueError):
      return status.group(1)
  return None


def free_bytes(path: str) -> Optional[int]:
  """Bytes free to this user where local `path` (or its nearest existing parent) lies; None for
  URLs, whose stores have no such figure."""
  if is_url(path):
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def size_text(num_bytes: int) -> str:
  """'612 KB', '3.61 GB': 3 significant digits, decimal units."""
  for unit, scale in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if num_bytes >= scale:
      return f'{num_bytes / scale:.3g} {unit}'
  return f'{num_bytes} bytes'


def free_text(path: str) -> str:
  free = free_bytes(path)
  return 'free space unknown' if free is None else f'{size_text(free)} free there'


def cannot_write(path: str, error: BaseException) -> StorageError:
  """The StorageError of a failed write of `path`."""
  reason = io_failure(error) or f'{type(error).__name__}: {error}'
  return StorageError(f'cannot write {path} ({reason}; {free_text(path)}): free space or fix '
                      'the storage, then rerun the same command.')


# ------------------------------------------------------------------------------------------------
# Writing whole files and whole records.


def replace_file(path: str, data: Union[bytes, str]) -> None:
  """Writes `data` (str: UTF-8) to `path`, which then holds either its old content or all of
  `data`, never a part: a local file is written beside it, synced and renamed over it (a rename
  within a directory is atomic on POSIX file systems). Raises StorageError when it fails."""
  if isinstance(data, str):
    data = data.encode('utf-8')
  if is_url(path):
    # An object store makes an object visible only once its upload is complete.
    with _gfile().GFile(path, 'wb') as f:
      f.write(data)
    return
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f'.{os.path.basename(path)}.{os.getpid()}.tmp')
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise cannot_write(path, e) from e
    raise


class AppendFile:
  """A file that grows by whole records: what is written between two `flush` calls is appended
  completely or, when the write fails, not at all (a local file is cut back to its length
  before), so a rerun appends after the last whole record. Raises StorageError when it fails."""

  def __init__(self, path: str):
    self.path = path
    self._buffer = bytearray()
    if is_url(path):
      self._file, self._fd = _gfile().GFile(path, 'ab'), None
    else:
      self._file = None
      try:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
      except OSError as e:
        raise cannot_write(path, e) from e

  def write(self, data: Union[bytes, str]) -> None:
    self._buffer += data.encode('utf-8') if isinstance(data, str) else data

  def flush(self) -> None:
    data, self._buffer = bytes(self._buffer), bytearray()
    if self._fd is None:
      self._file.write(data)
      self._file.flush()
      return
    size = os.fstat(self._fd).st_size
    try:
      view = memoryview(data)
      while view:  # a full disk can make os.write write a part and fail on the rest
        view = view[os.write(self._fd, view):]
    except OSError as e:
      try:
        os.ftruncate(self._fd, size)
      finally:
        raise cannot_write(self.path, e) from e

  def close(self) -> None:
    if self._buffer:
      self.flush()
    if self._fd is None:
      self._file.close()
    else:
      os.close(self._fd)
