"""Class names and colours of the declared datasets, indexed by train id (0..K-1), and colouring
label maps.

No TensorFlow here: prediction and visualisation code imports this module on its own. The names
and orders are the declarations' (`segvit_jax.data.datasets`), which are mmseg's; a dataset
without a palette of its own gets the VOC colour table.
"""

from __future__ import annotations

import numpy as np

from segvit_jax.data import datasets

IGNORE_COLOR = (0, 0, 0)  # palettes below never use pure black for a class


def class_names(name: str, num_classes: int | None = None) -> tuple[str, ...]:
  """The class names of dataset `name`, indexed by train id.

  Args:
    name: a declared dataset ('ade20k', 'coco_stuff10k', 'pascal_context' (60, or 59 with
      num_classes=59), 'synthetic' (num_classes picks K), ...), or 'name/config' of a TFDS
      builder config ('pascal_context/59').
    num_classes: checked against the dataset when given; ValueError when it is not its K.
  """
  base, _, variant = name.partition('/')
  dataset = datasets.get(base)
  if not variant:
    return dataset.classes(num_classes)
  names = dataset.classes(dataset.tfds_config(variant).num_classes)
  if num_classes is not None and num_classes != len(names):
    raise ValueError(f'{name} has {len(names)} classes, the config says {num_classes}.')
  return names


def color_table(num_colors: int) -> np.ndarray:
  """(num_colors, 3) uint8 distinct colours from the bit-interleaving PASCAL VOC scheme.

  Entry k is the VOC colour of index k + 1, so no class is black (black = ignore).
  """
  out = np.zeros((num_colors, 3), np.uint8)
  for k in range(num_colors):
    c, rgb = k + 1, [0, 0, 0]
    for shift in range(7, -1, -1):
      for ch in range(3):
        rgb[ch] |= ((c >> ch) & 1) << shift
      c >>= 3
    out[k] = rgb
  return out


def palette(name: str, num_classes: int | None = None) -> np.ndarray:
  """(K, 3) uint8 RGB colour of each class of dataset `name` (see class_names)."""
  k = len(class_names(name, num_classes))
  colors = datasets.get(name.partition('/')[0]).palette
  return color_table(k) if colors is None else np.asarray(colors, np.uint8).reshape(k, 3)


def colorize(label: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """(H, W) int label map -> (H, W, 3) uint8 image; 255 (ignore) becomes IGNORE_COLOR."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:] = IGNORE_COLOR
  lut[:len(colors)] = colors
  return lut[np.asarray(label).astype(np.int64).clip(0, 255)]
