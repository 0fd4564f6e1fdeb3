"""Shared pieces of the dataset builders: archive access, checked decoding, label maps.

Everything here runs at build time (plain Python, numpy, PIL, scipy), so a bad file fails
the build with its name instead of failing a training run hours later inside tf.data.

Label conventions: a label map is uint8 (H, W) in train-id space, 0..K-1 for classes and
255 for "ignore". Raw dataset ids are mapped with a lookup table (LUT) whose entry -1 marks
an id the dataset must never contain.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from segvit_jax.data import mmseg_rules
from segvit_jax.errors import UserError


class DatasetError(UserError):
  """Bad or missing source data; the message names the file and what was expected."""


# --------------------------------------------------------------------------------------
# Archives: zip, uncompressed tar and plain folders behind one interface.


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


def manual_dir(dl_manager, name: str, instructions: str) -> str:
  """dl_manager.manual_dir, with our instructions when it is missing or empty."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # tfds: "Manual directory ... does not exist or is empty"
    raise DatasetError(f'{name}: {e}') from e


def missing_source_error(name: str, manual_dir: str, instructions: str) -> DatasetError:
  return DatasetError(
      f'{name}: the source files are missing from the manual directory '
      f'{os.fspath(manual_dir)!s}.\n{instructions}')


# --------------------------------------------------------------------------------------
# Checked decoding.


def check_image(data: bytes, name: str) -> tuple[int, int]:
  """Fully decodes an encoded image as training will (`mmseg_rules.decode_image`): its (h, w).

  The (h, w) is after the EXIF orientation, as OpenCV (and so mmseg) reads the image.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt = im.format
  except Exception as e:  # PIL raises many types for bad data.
    raise DatasetError(f'{name}: corrupt or unreadable image ({e}).') from e
  if fmt not in ('JPEG', 'PNG'):
    raise DatasetError(f'{name}: expected a JPEG or PNG image, got {fmt}.')
  try:
    image = mmseg_rules.decode_image(data)
  except Exception as e:  # truncation and corrupt entropy data surface here
    raise DatasetError(f'{name}: corrupt or unreadable image ({e}).') from e
  return image.shape[0], image.shape[1]


def exif_swaps_sides(data: bytes) -> bool:
  """True when the image's EXIF orientation (5..8) swaps its height and width when decoded."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
  except Exception:  # pylint: disable=broad-except
    return False


def decode_png_label(data: bytes, name: str) -> np.ndarray:
  """Decodes a single-channel PNG label map to a 2-D integer array (raw values)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode not in ('L', 'P', 'I', 'I;16'):
        raise DatasetError(
            f'{name}: a label map must be a single-channel PNG, got mode {im.mode!r}.')
      arr = np.asarray(im)
  except DatasetError:
    raise
  except Exception as e:
    raise DatasetError(f'{name}: corrupt or unreadable label PNG ({e}).') from e
  if arr.ndim != 2:
    raise DatasetError(f'{name}: label map has shape {arr.shape}, expected (H, W).')
  return arr


def decode_mat_label(data: bytes, name: str, key: str) -> np.ndarray:
  """Reads the 2-D label array `key` from a MATLAB (v5/v7) .mat file."""
  import scipy.io  # Only the .mat datasets need scipy.
  try:
    mat = scipy.io.loadmat(io.BytesIO(data), variable_names=[key])
  except Exception as e:
    raise DatasetError(f'{name}: corrupt or unreadable .mat file ({e}).') from e
  if key not in mat:
    raise DatasetError(f'{name}: the .mat file has no variable {key!r}.')
  arr = np.asarray(mat[key])
  if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer)
                           or np.issubdtype(arr.dtype, np.floating)):
    raise DatasetError(
        f'{name}: {key!r} has shape {arr.shape} and dtype {arr.dtype}; expected a 2-D '
        'integer label map.')
  if np.issubdtype(arr.dtype, np.floating):
    # MATLAB stores doubles by default; accept them only when they hold whole numbers.
    if not np.all(np.isfinite(arr) & (arr == np.round(arr))):
      raise DatasetError(f'{name}: {key!r} holds non-integer values.')
    arr = arr.astype(np.int64)
  return arr


def make_lut(mapping: dict[int, int], size: int, keep_ignore: bool = True) -> np.ndarray:
  """A lookup table raw id -> train id; -1 marks ids that must not occur."""
  lut = np.full((size,), -1, np.int32)
  for k, v in mapping.items():
    lut[k] = v
  ignore = mmseg_rules.IGNORE_LABEL
  if keep_ignore and size > ignore and lut[ignore] == -1:
    lut[ignore] = ignore
  return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, name: str) -> np.ndarray:
  """Maps raw ids through `lut` to uint8 train ids; unknown ids fail with the file name."""
  raw = raw.astype(np.int64)
  bad = (raw < 0) | (raw >= lut.shape[0])
  if not bad.any():
    mapped = lut[raw]
    bad = mapped < 0
  if bad.any():
    values = np.unique(raw[bad])[:10].tolist()
    valid = np.flatnonzero(lut >= 0)
    raise DatasetError(
        f'{name}: label values {values} are out of range (valid raw values: '
        f'{_ranges(valid)}).')
  return mapped.astype(np.uint8)


def _ranges(values: Iterable[int]) -> str:
  """Compact text for a sorted set of ints: '0-11, 13-25, 255'."""
  values = list(values)
  out, start = [], None
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      out.append(str(start) if start == v else f'{start}-{v}')
      start = None
  return ', '.join(out)


def check_same_size(image_hw: tuple[int, int], label: np.ndarray, image_name: str,
                    label_name: str, rotated: bool = False) -> None:
  """Image (as decoded) and label sizes agree; `rotated`: the image's EXIF orientation swaps
  its sides (`exif_swaps_sides`), named in the message as the likely cause."""
  if tuple(image_hw) != tuple(label.shape):
    why = (" The image's EXIF orientation rotates it (OpenCV, and so mmseg, applies it; the "
           'label is not rotated): store the image upright, without the orientation tag.'
           if rotated else '')
    raise DatasetError(
        f'{image_name}: image is {image_hw[0]}x{image_hw[1]} (HxW) but its label '
        f'{label_name} is {label.shape[0]}x{label.shape[1]}.{why}')


def encode_png(label: np.ndarray) -> bytes:
  """Encodes a uint8 (H, W) label map as a single-channel PNG."""
  buf = io.BytesIO()
  Image.fromarray(label.astype(np.uint8), mode='L').save(buf, format='PNG')
  return buf.getvalue()


def even_range(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of `count` near-equal contiguous parts of n items.

  The first n % count parts get one extra item, as tfds.even_splits does, so every host
  reads a disjoint block and the blocks cover all n items.
  """
  if not 0 <= index < count:
    raise ValueError(f'shard_index {index} is not in [0, num_shards={count}).')
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return start, start + base + (1 if index < extra else 0)


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


def warn_count(log, what: str, found: int, expected: int) -> None:
  if found != expected:
    log.warning('%s: found %d examples, the official release has %d (partial data?).',
                what, found, expected)


def is_junk(name: str) -> bool:
  """macOS resource forks and folders that archivers add next to the real files."""
  base = name.rsplit('/', 1)[-1]
  return name.startswith('__MACOSX/') or '/__MACOSX/' in name or base.startswith('._')


# --------------------------------------------------------------------------------------
# TFDS glue shared by the three builders (tensorflow_datasets is imported lazily so that
# the checks above stay importable without TensorFlow).


def segmentation_features():
  """Encoded image (JPEG as shipped), label as single-channel PNG in train ids, file name."""
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'file_name': tfds.features.Text(),
  })


def dataset_info(builder, description: str, homepage: str, citation: str):
  import tensorflow_datasets as tfds
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=segmentation_features(),
      homepage=homepage,
      citation=citation,
      # Keep the sorted file order: eval results line up with file lists, and
      # training shuffles in the input pipeline anyway.
      disable_shuffling=True,
  )


def make_example(image_bytes: bytes, image_name: str, raw_label: np.ndarray,
                 label_name: str, lut: np.ndarray, file_name: str) -> dict:
  """Validates one (image, raw label) pair and returns the TFDS example.

  Raises DatasetError naming the file for a corrupt image, a label value that the
  dataset cannot contain, or an image/label size mismatch.
  """
  hw = check_image(image_bytes, image_name)
  label = apply_lut(raw_label, lut, label_name)
  check_same_size(hw, label, image_name, label_name, exif_swaps_sides(image_bytes))
  return {'image': image_bytes, 'label': encode_png(label), 'file_name': file_name}
