"""Class names and colours of a model, colour overlays, and the predictions figure.

One resolver, `classes(config)`, decides the names and colours for training, evaluation and
prediction alike: the ones stored with a converted official checkpoint (`config.convert`, from
the checkpoint's meta), else the dataset's (`palettes`), else generic ('0', '1', ... and the VOC
colour table).
"""

import math
from typing import NamedTuple, Sequence

import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segvit_jax.data import mmseg_rules
from segvit_jax.data import palettes


class Classes(NamedTuple):
  names: tuple[str, ...]  # K names, indexed by train id
  colors: np.ndarray  # (K, 3) uint8 RGB


def classes(config: ml_collections.ConfigDict) -> Classes:
  """The names and colours of the K = config.model.num_classes classes (see module docstring)."""
  k = int(config.model.num_classes)
  stored = config.get('convert') or {}
  names = tuple(stored.get('class_names') or ())
  colors = tuple(stored.get('palette') or ())
  if len(names) != k:
    try:
      names = tuple(palettes.class_names(config.dataset.name, k))
    except ValueError:
      names = tuple(str(i) for i in range(k))
  if len(colors) != k:
    try:
      colors = palettes.palette(config.dataset.name, k)
    except ValueError:
      colors = palettes.color_table(k)
  return Classes(names, np.asarray(colors, np.uint8).reshape(k, 3))


def overlay(image: np.ndarray, labels: np.ndarray, colors: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """(H, W, 3) uint8: `image` blended with the colour of each pixel's class (255: ignore)."""
  color = palettes.colorize(labels, colors).astype(np.float32)
  return np.round(image.astype(np.float32) * (1 - alpha) + color * alpha).astype(np.uint8)


def _font():
  try:  # a scalable font where Pillow has FreeType (its bitmap font drops spaces)
    return ImageFont.load_default(size=13)
  except (TypeError, OSError):
    return ImageFont.load_default()


_ROW_HEIGHT = 160  # every row is scaled to this height
_GAP = 4
_HEADER = 18
_LEGEND_ENTRY = (170, 18)  # (width, height) of one legend entry


def _row_tiles(image, label, pred, colors) -> list[Image.Image]:
  scale = _ROW_HEIGHT / image.shape[0]
  size = (max(1, round(image.shape[1] * scale)), _ROW_HEIGHT)
  return [Image.fromarray(image).resize(size, Image.BILINEAR),
          Image.fromarray(palettes.colorize(label, colors)).resize(size, Image.NEAREST),
          Image.fromarray(palettes.colorize(pred, colors)).resize(size, Image.NEAREST)]


def predictions_figure(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       names: Sequence[str], colors: np.ndarray) -> Image.Image:
  """Rows image | ground truth | prediction, with a legend of the classes that appear.

  rows: (image (H, W, 3) uint8, label (H, W), prediction (H, W)), labels with 255 = ignore.
  """
  tiles = [_row_tiles(*row, colors) for row in rows]
  width = max(sum(t.size[0] for t in row) + 2 * _GAP for row in tiles)
  shown = sorted({int(c) for _, label, pred in rows for c in np.unique(np.concatenate(
      [label.ravel(), pred.ravel()])) if c != mmseg_rules.IGNORE_LABEL})
  columns = max(1, width // _LEGEND_ENTRY[0])
  legend_rows = math.ceil(len(shown) / columns)
  height = _HEADER + len(tiles) * (_ROW_HEIGHT + _GAP) + legend_rows * _LEGEND_ENTRY[1] + 8
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = _font()
  x = 0
  for title, tile in zip(('image', 'ground truth', 'prediction'), tiles[0]):
    draw.text((x + 4, 2), title, fill=(0, 0, 0), font=font)
    x += tile.size[0] + _GAP
  y = _HEADER
  for row in tiles:
    x = 0
    for tile in row:
      canvas.paste(tile, (x, y))
      x += tile.size[0] + _GAP
    y += _ROW_HEIGHT + _GAP
  for n, c in enumerate(shown):
    lx = (n % columns) * _LEGEND_ENTRY[0] + 4
    ly = y + 4 + (n // columns) * _LEGEND_ENTRY[1]
    draw.rectangle([lx, ly, lx + 12, ly + 12], fill=tuple(int(v) for v in colors[c]),
                   outline=(0, 0, 0))
    draw.text((lx + 18, ly - 1), f'{c}: {names[c]}'[:24], fill=(0, 0, 0), font=font)
  return canvas
