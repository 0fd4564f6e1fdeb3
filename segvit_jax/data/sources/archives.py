"""Read-only access to the official downloads: zip, tar and plain folders behind one interface.

Build time only (plain Python): `open_archive` picks the reader, `find_source` the download in the
manual directory, `match_names` the members a dataset's layout names.
"""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
from typing import Callable, Iterable, Sequence

from segvit_jax.data.sources import DatasetError


class Archive:
  """Read-only access to the files of a zip, a tar or a folder by relative posix name."""

  def __init__(self, path: str):
    self.path = os.fspath(path)

  def names(self) -> list[str]:
    raise NotImplementedError

  def read(self, name: str) -> bytes:
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self):
    return f'{type(self).__name__}({self.path!r})'


class ZipArchive(Archive):

  def __init__(self, path: str):
    super().__init__(path)
    try:
      self._zip = zipfile.ZipFile(self.path)
    except (zipfile.BadZipFile, OSError) as e:
      raise DatasetError(f'{self.path}: not a readable zip archive ({e}).') from e
    self._names = [i.filename for i in self._zip.infolist() if not i.is_dir()]

  def names(self):
    return self._names

  def read(self, name):
    try:
      return self._zip.read(name)
    except Exception as e:  # BadZipFile (CRC), zlib.error, KeyError, OSError...
      raise DatasetError(f'{self.path}: cannot read {name} ({e}).') from e

  def close(self):
    self._zip.close()


class TarArchive(Archive):
  """An uncompressed tar: members are read by seeking, so any order is cheap."""

  def __init__(self, path: str):
    super().__init__(path)
    try:
      self._tar = tarfile.open(self.path, 'r:')
      self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as e:
      raise DatasetError(f'{self.path}: not a readable tar archive ({e}).') from e
    # Some tools write './VOCdevkit/...': normalise to 'VOCdevkit/...'.
    self._members = {_strip_dot(k): v for k, v in self._members.items()}

  def names(self):
    return list(self._members)

  def read(self, name):
    try:
      return self._tar.extractfile(self._members[name]).read()
    except (tarfile.TarError, OSError, KeyError) as e:
      raise DatasetError(f'{self.path}: cannot read {name} ({e}).') from e

  def close(self):
    self._tar.close()


class DirArchive(Archive):
  """A folder; names are relative to `root` (`prefix` keeps the archive's top folder)."""

  def __init__(self, root: str, prefix: str = ''):
    super().__init__(root)
    self._prefix = prefix
    base = os.path.join(self.path, prefix) if prefix else self.path
    names = []
    for dirpath, _, files in os.walk(base):
      for f in files:
        rel = os.path.relpath(os.path.join(dirpath, f), self.path)
        names.append(rel.replace(os.sep, '/'))
    self._names = sorted(names)

  def names(self):
    return self._names

  def read(self, name):
    try:
      with open(os.path.join(self.path, name), 'rb') as f:
        return f.read()
    except OSError as e:
      raise DatasetError(f'cannot read {os.path.join(self.path, name)} ({e}).') from e


def _strip_dot(name: str) -> str:
  while name.startswith('./'):
    name = name[2:]
  return name


def is_compressed_tar(path: str) -> bool:
  """True for gzip / bzip2 / xz files, which tar can only read front to back."""
  with open(path, 'rb') as f:
    head = f.read(6)
  return (head[:2] == b'\x1f\x8b' or head[:3] == b'BZh'
          or head[:6] == b'\xfd7zXZ\x00')


def open_archive(path: str, extract: Callable[[str], str] | None = None) -> Archive:
  """Opens a zip, a tar or a folder. Compressed tars go through `extract` (to a folder).

  Args:
    path: the archive file or an already extracted folder.
    extract: maps a compressed archive to the folder it was extracted to, e.g.
      `dl_manager.extract`. Random access into a gzip stream is quadratic, so a
      compressed tar is extracted once instead.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return DirArchive(path)
  if zipfile.is_zipfile(path):
    return ZipArchive(path)
  if is_compressed_tar(path):
    if extract is None:
      raise DatasetError(f'{path}: a compressed tar needs an extraction step.')
    return DirArchive(os.fspath(extract(path)))
  return TarArchive(path)


def find_source(manual_dir: str, candidates: Sequence[str]) -> str | None:
  """The first of `candidates` (file or folder names) present in `manual_dir`."""
  for c in candidates:
    p = os.path.join(os.fspath(manual_dir), c)
    if os.path.exists(p):
      return p
  return None


def match_names(names: Iterable[str], pattern: str) -> dict[str, str]:
  """{group(1): name} for the names that fully match `pattern` (one capture group)."""
  reg = re.compile(pattern)
  out = {}
  for n in names:
    if is_junk(n):
      continue
    m = reg.fullmatch(n)
    if m:
      out[m.group(1)] = n
  return out


def is_junk(name: str) -> bool:
  """macOS resource forks and folders that archivers add next to the real files."""
  base = name.rsplit('/', 1)[-1]
  return name.startswith('__MACOSX/') or '/__MACOSX/' in name or base.startswith('._')
