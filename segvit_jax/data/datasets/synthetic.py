"""A synthetic segmentation task: textured shapes on textured backgrounds, K classes.

Class 0 is the background: a smooth, low-frequency two-colour blend. Class c >= 1 is a
shape of type SHAPES[c - 1] filled with the high-frequency texture
TEXTURES[c - 1] (stripes of some orientation, checkers, dots...; periods of 4-7
pixels). Every region, background included, draws its two colours uniformly at random, so
colour says nothing about the class: a model has to read texture (and shape). Shapes are
17-48 pixels across at 96x96 (scaled with the image size), 3-5 per image, and may occlude
each other. Every example is a pure function of (seed, split, index).

Numpy only: `load` renders a whole split into memory (a few MB, cached) for
`segvit_jax.data.numpy_pipeline`, so the demo, the benchmarks and the tests need no files and no
TensorFlow. The declaration (`config.dataset.source='synthetic'`): the class names, the VOC colour
table, and the in-memory source; configs/synthetic.py is its config.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from segvit_jax.data import registry

# Foreground class c (1..K-1) = texture c-1 on shape c-1; class 0 = background.
TEXTURES = ('h-stripes', 'v-stripes', 'checker', 'diag-stripes', 'dots', 'antidiag-stripes',
            'crosshatch', 'rings')
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'ellipse', 'hexagon', 'bar', 'cross')
SPLIT_CODES = {'train': 0, 'validation': 1}
_MIN_CONTRAST = 90.0  # Euclidean RGB distance between the two colours of a region
_NOISE_STD = 4.0


def class_names(num_classes: int | None = None) -> tuple[str, ...]:
  """Names of the synthetic classes: 'background', then '<texture> <shape>' (default K = 5)."""
  num_classes = 5 if num_classes is None else num_classes
  if not 2 <= num_classes <= len(TEXTURES) + 1:
    raise ValueError(f'synthetic num_classes must be in [2, {len(TEXTURES) + 1}], '
                     f'got {num_classes}.')
  return ('background',) + tuple(f'{TEXTURES[i]} {SHAPES[i]}' for i in range(num_classes - 1))


def _image_hw(image_size) -> tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  h, w = image_size
  return int(h), int(w)


@functools.lru_cache(maxsize=4)
def _pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Two random RGB colours at least _MIN_CONTRAST apart (so the texture shows)."""
  for _ in range(20):
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if np.linalg.norm(a - b) >= _MIN_CONTRAST:
      break
  return a.astype(np.float32), b.astype(np.float32)


def _texture(kind: str, yy, xx, rng: np.random.Generator, centre) -> np.ndarray:
  """Pattern intensity in [0, 1] on the pixel grid, with random period and phase."""
  period = rng.uniform(4.5, 6.5)
  phase = rng.uniform(0, 2 * math.pi)
  k = 2 * math.pi / period
  if kind == 'h-stripes':
    return 0.5 + 0.5 * np.sin(k * yy + phase)
  if kind == 'v-stripes':
    return 0.5 + 0.5 * np.sin(k * xx + phase)
  if kind == 'diag-stripes':
    return 0.5 + 0.5 * np.sin(k * (xx + yy) / math.sqrt(2) + phase)
  if kind == 'antidiag-stripes':
    return 0.5 + 0.5 * np.sin(k * (xx - yy) / math.sqrt(2) + phase)
  if kind == 'checker':
    cell = period * 0.7
    oy, ox = rng.uniform(0, cell, 2)
    return ((np.floor((yy + oy) / cell) + np.floor((xx + ox) / cell)) % 2).astype(np.float32)
  if kind == 'dots':
    oy, ox = rng.uniform(0, period, 2)
    dy = (yy + oy) % period - period / 2
    dx = (xx + ox) % period - period / 2
    return (np.sqrt(dy * dy + dx * dx) < period * 0.28).astype(np.float32)
  if kind == 'crosshatch':
    oy, ox = rng.uniform(0, period, 2)
    lines = ((yy + oy) % period < period * 0.35) | ((xx + ox) % period < period * 0.35)
    return lines.astype(np.float32)
  if kind == 'rings':
    r = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    return 0.5 + 0.5 * np.sin(k * r + phase)
  raise ValueError(f'unknown texture {kind!r}')


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """Smooth random field in [0, 1]: a coarse random grid, bilinearly upsampled."""
  gh, gw = max(2, h // 20 + 2), max(2, w // 20 + 2)
  grid = rng.uniform(0, 1, (gh, gw))
  ys = np.linspace(0, gh - 1, h)
  xs = np.linspace(0, gw - 1, w)
  y0 = np.clip(np.floor(ys).astype(int), 0, gh - 2)
  x0 = np.clip(np.floor(xs).astype(int), 0, gw - 2)
  fy = (ys - y0)[:, None]
  fx = (xs - x0)[None, :]
  g00 = grid[y0][:, x0]
  g01 = grid[y0][:, x0 + 1]
  g10 = grid[y0 + 1][:, x0]
  g11 = grid[y0 + 1][:, x0 + 1]
  return ((1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11))


def _shape_mask(kind: str, yy, xx, centre, size: float, angle: float) -> np.ndarray:
  """Boolean mask of a shape of radius about `size` pixels, rotated by `angle`."""
  dy, dx = yy - centre[0], xx - centre[1]
  c, s = math.cos(angle), math.sin(angle)
  u = c * dx + s * dy
  v = -s * dx + c * dy
  au, av = np.abs(u), np.abs(v)
  if kind == 'circle':
    return u * u + v * v <= size * size
  if kind == 'square':
    return (au <= 0.85 * size) & (av <= 0.85 * size)
  if kind == 'triangle':
    # Equilateral with circumradius `size`: inside all three edges, each at the inradius
    # (size / 2) along its outward normal.
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
      normal = 2 * math.pi * k / 3 + math.pi / 2
      inside &= (u * math.cos(normal) + v * math.sin(normal)) <= 0.5 * size
    return inside
  if kind == 'diamond':
    return au + av <= 1.15 * size
  if kind == 'ellipse':
    return (u / size) ** 2 + (v / (0.55 * size)) ** 2 <= 1.0
  if kind == 'hexagon':
    return np.maximum(av, au * math.sin(math.pi / 3) + av * 0.5) <= 0.9 * size
  if kind == 'bar':
    return (au <= size) & (av <= 0.55 * size)
  if kind == 'cross':
    return ((au <= size) & (av <= 0.4 * size)) | ((av <= size) & (au <= 0.4 * size))
  raise ValueError(f'unknown shape {kind!r}')


def render(index: int, *, seed: int, split: str, image_size=96,
           num_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """Example `index` of `split`: (image (H, W, 3) uint8 RGB, label (H, W) uint8 in 0..K-1)."""
  class_names(num_classes)  # validates num_classes
  if split not in SPLIT_CODES:
    raise ValueError(f"synthetic split must be 'train' or 'validation', got {split!r}.")
  h, w = _image_hw(image_size)
  rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
  yy, xx = _pixel_centres(h, w)

  a, b = _two_colours(rng)
  p = _background(h, w, rng).astype(np.float32)[..., None]
  image = a + (b - a) * p
  label = np.zeros((h, w), np.uint8)

  scale = min(h, w)
  for _ in range(rng.integers(3, 6)):
    cls = int(rng.integers(1, num_classes))
    size = rng.uniform(0.09, 0.25) * scale  # radius: 17..48 px across at 96
    centre = (rng.uniform(0.5 * size, h - 0.5 * size), rng.uniform(0.5 * size, w - 0.5 * size))
    angle = rng.uniform(-math.pi, math.pi)
    a, b = _two_colours(rng)
    # Render inside the shape's bounding box only (every shape fits in radius 1.2 size).
    r = int(math.ceil(1.2 * size))
    y0, y1 = max(0, int(centre[0]) - r), min(h, int(centre[0]) + r + 1)
    x0, x1 = max(0, int(centre[1]) - r), min(w, int(centre[1]) + r + 1)
    by, bx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
    mask = _shape_mask(SHAPES[cls - 1], by, bx, centre, size, angle)
    p = _texture(TEXTURES[cls - 1], by, bx, rng, centre)[..., None]
    box = image[y0:y1, x0:x1]
    box[mask] = (a + (b - a) * p)[mask]
    label[y0:y1, x0:x1][mask] = cls

  image += _NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), label


@functools.lru_cache(maxsize=8)
def make_split(split: str, num_examples: int, *, seed: int = 0, image_size=96,
               num_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a split: images (N, H, W, 3) uint8 and labels (N, H, W) uint8.

  Cached; the returned arrays are read-only.
  """
  images, labels = zip(*(render(i, seed=seed, split=split, image_size=image_size,
                                num_classes=num_classes) for i in range(num_examples)))
  images, labels = np.stack(images), np.stack(labels)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def _sizes(dataset_config) -> dict:
  size = dataset_config.get('synthetic_image_size', 96)
  return dict(seed=int(dataset_config.get('synthetic_seed', 0)),
              image_size=size if isinstance(size, int) else tuple(size),
              num_classes=int(dataset_config.num_classes))


def num_examples(dataset_config, split: str) -> int:
  if split == 'train':
    return int(dataset_config.get('synthetic_num_train', 1000))
  if split == 'validation':
    return int(dataset_config.get('synthetic_num_val', 100))
  raise ValueError(f"synthetic split must be 'train' or 'validation', got {split!r}.")


def load(dataset_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The split `config.dataset` describes: images (N, H, W, 3) uint8 RGB and labels (N, H, W)
  uint8 in 0..K-1, example i at index i (`make_split`: cached, read-only)."""
  return make_split(split, num_examples(dataset_config, split), **_sizes(dataset_config))


DATASET = registry.register(registry.Dataset(
    name='synthetic',
    class_names=class_names,
    in_memory=registry.InMemorySource(
        num_examples=num_examples, load=load,
        split_size_keys={'train': 'synthetic_num_train', 'validation': 'synthetic_num_val'}),
))
