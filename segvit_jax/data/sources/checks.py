"""Build-time checks of one example: checked decoding, label maps, sizes, the TFDS example.

Everything here runs at build time (plain Python, numpy, PIL, scipy), so a bad file fails
the build with its name instead of failing a training run hours later inside tf.data.

Label conventions: a label map is uint8 (H, W) in train-id space, 0..K-1 for classes and
255 for "ignore". Raw dataset ids are mapped with a lookup table (LUT) whose entry -1 marks
an id the dataset must never contain.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
from PIL import Image

from segvit_jax.data import mmseg_rules
from segvit_jax.data.sources import DatasetError


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


def warn_count(log, what: str, found: int, expected: int) -> None:
  if found != expected:
    log.warning('%s: found %d examples, the official release has %d (partial data?).',
                what, found, expected)


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
