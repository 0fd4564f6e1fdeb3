"""Image resizing that matches PyTorch's `F.interpolate` (align_corners=False).

Both kernels are applied as two small interpolation matrices (one per spatial axis) built in numpy
at trace time, so shapes stay static under `jit` and the result is exact to float32 rounding.

- `resize_bilinear`: PyTorch 'bilinear', no antialiasing (source index clamped at 0, two taps).
  `jax.image.resize(..., antialias=False)` agrees on upsampling; we keep one implementation so that
  every resize in the model, the loss and evaluation is the same function.
- `resize_bicubic_torch`: PyTorch 'bicubic' (Keys kernel a = -0.75, indices clamped at the borders).
  `jax.image.resize('cubic')` uses a = -0.5 and renormalises at borders, which breaks parity with
  position embeddings resized by mmseg.
"""

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix M with out = M @ in along one axis.

  The source index is computed in float32 as PyTorch's CPU kernel does; in float64 the weights
  would differ from PyTorch's by up to ~1e-4 at sizes such as 2048 -> 683.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m.astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2. t in [0, 1)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix of PyTorch's bicubic resize along one axis."""
  # In float32 as PyTorch computes it; not clamped at 0 for cubic.
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(src).astype(np.int64)
  weights = _cubic_weights(src - base.astype(np.float32)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for tap in range(4):
    idx = np.clip(base - 1 + tap, 0, in_size - 1)
    np.add.at(m, (rows, idx), weights[:, tap])
  return m.astype(np.float32)


def _resize_2d(x: jnp.ndarray, size, matrix_fn, axes) -> jnp.ndarray:
  ah, aw = axes
  out_h, out_w = size
  in_h, in_w = x.shape[ah], x.shape[aw]
  if (in_h, in_w) == (out_h, out_w):
    return x
  dtype = x.dtype
  mh = jnp.asarray(matrix_fn(out_h, in_h))
  mw = jnp.asarray(matrix_fn(out_w, in_w))
  x = jnp.moveaxis(jnp.tensordot(mh, x.astype(jnp.float32), axes=([1], [ah])), 0, ah)
  x = jnp.moveaxis(jnp.tensordot(mw, x, axes=([1], [aw])), 0, aw)
  return x.astype(dtype)


def resize_bilinear(x: jnp.ndarray, size, axes=(1, 2)) -> jnp.ndarray:
  """Bilinear resize of `x` along `axes` (default NHWC's H, W) to `size` = (h, w)."""
  return _resize_2d(x, tuple(size), bilinear_matrix, axes)


def resize_bicubic_torch(x: jnp.ndarray, size, axes=(1, 2)) -> jnp.ndarray:
  """PyTorch-compatible bicubic resize of `x` along `axes` to `size` = (h, w)."""
  return _resize_2d(x, tuple(size), bicubic_matrix, axes)
