"""Inference as mmseg 0.24's `EncoderDecoder` runs it
(`mmseg/models/segmentors/encoder_decoder.py`), with static shapes under jit, and the one
`InferenceSpec` of its settings, built from the config.

    spec = InferenceSpec.from_config(config)           # config.eval + the test resize rule
    probs = predict_probs(score_fn, batch, spec)       # (B, Hl, Wl, K) softmax at label size
    labels = predict(score_fn, batch, spec)            # (B, Hl, Wl) int32, 255 outside

Per image, mmseg: resize by the test rule -> sliding windows (or the whole image) -> average of
the window scores -> bilinear resize (align_corners=False) to the original label size -> softmax
over classes -> argmax; with `--aug-test`, the softmax outputs of every scale ratio and flip are
averaged before the argmax. Here a batch holds images of different sizes padded to a static bucket
(see `input_pipeline`), so every size is a traced value and every shape a static bucket:

- Sliding windows: the window grid and offsets follow mmseg's formulas per image; the number of
  window positions is the static maximum for the bucket, and windows outside an image's own grid
  get weight 0 (and are skipped entirely when no image of the batch needs them).
- Resizes between dynamic sizes gather two taps per output row and column, with indices and
  weights computed in-graph from the traced sizes by PyTorch's bilinear formula (as
  `resize.bilinear_matrix`) in PyTorch's float32 arithmetic: the weights are bit-identical to
  `F.interpolate`'s.

Deviations from mmseg, all forced by static shapes or by what the batch carries:
- An image smaller than the crop: mmseg runs the model on the smaller (non-square) patch; we run
  it on a full crop whose remainder is bucket padding (zeros after normalisation). Only the
  image's own pixels are used afterwards, but the ViT attends to the padding tokens. With the
  official single-scale test resizes this needs an aspect ratio above 3.2 (ADE: short side 640 =
  crop, long side <= 2048) and never happens on COCO-Stuff / PASCAL-Context (`min_size` >= crop);
  in multi-scale TTA it happens on ADE at ratios 0.5 / 0.75, where the unmodified official code
  would crash instead (`mmseg/models/segmentors/encoder_decoder.py`).
- `mode='whole'` runs the model on the padded bucket, not on the image at its own size.
- Multi-scale TTA resizes the batch's scale-1 image (already resized by the test rule) to each
  scale's size in-graph; mmseg resizes the original image (cv2 bilinear) for each ratio. The
  sizes themselves are mmseg's: the batch carries them ('scaled_size', computed with
  `mmseg_rules.rescale_size` by the input pipeline or the predictor, in mmcv's float64).
"""

import dataclasses
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax.data import mmseg_rules
from segvit_jax.errors import UserError

ScoreFn = Callable[[jnp.ndarray], jnp.ndarray]

# TTA image buckets are rounded up to this (a multiple of the patch size, for `mode='whole'`).
_BUCKET_MULTIPLE = 32


# --------------------------------------------------------------------------------------------
# The settings.


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
  """How images are segmented at test time: mmseg's test pipeline and `test_cfg`.

  Built from a config by `from_config` alone; training evaluation, the figure, `predict` and
  `export` read their settings here.

  Attributes:
    num_classes: K, the model's output classes (config.model.num_classes).
    mode: 'slide' (sliding windows) or 'whole' (the model on the whole padded image).
    crop_size, stride: (h, w) of the sliding windows and their step.
    scales: config.eval.scales, the ratios whose test-resized size a batch carries
      ('scaled_size' (B, len(scales), 2)), whether or not multi-scale TTA is on.
    multi_scale: test-time augmentation over `scales` (mmseg's `--aug-test`).
    flip: with `multi_scale`, horizontal flips too.
    test_img_scale, test_min_size: the test resize rule (config.dataset,
      `mmseg_rules.rescale_size`); an empty scale is allowed only without ratios other than 1.
    mean, std: RGB normalisation of the model input, (x - mean) / std (config.dataset); the
      identity by default, for callers that hand over normalised images.
  """
  num_classes: int
  mode: str
  crop_size: Tuple[int, int]
  stride: Tuple[int, int]
  scales: Tuple[float, ...] = (1.0,)
  multi_scale: bool = False
  flip: bool = False
  test_img_scale: Tuple[int, ...] = ()
  test_min_size: int = 0
  mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: Tuple[float, float, float] = (1.0, 1.0, 1.0)

  def __post_init__(self):
    if self.mode not in ('slide', 'whole'):
      raise UserError(f"config.eval.mode={self.mode!r}: expected 'slide' or 'whole'.")
    if any(r != 1.0 for r in self.ratios) and not self.test_img_scale:
      raise UserError('config.eval.multi_scale with scales other than 1.0 needs the test resize '
                      'rule, config.dataset.test_img_scale (and test_min_size).')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'InferenceSpec':
    """The settings of `config`: config.eval, the test resize and normalisation of
    config.dataset, config.model.num_classes."""
    e, d = config.eval, config.dataset
    return cls(num_classes=int(config.model.num_classes), mode=e.mode,
               crop_size=tuple(int(s) for s in e.crop_size),
               stride=tuple(int(s) for s in e.stride),
               scales=tuple(float(r) for r in e.scales), multi_scale=bool(e.multi_scale),
               flip=bool(e.flip), test_img_scale=tuple(int(s) for s in d.test_img_scale),
               test_min_size=int(d.get('test_min_size', 0)),
               mean=tuple(float(x) for x in d.mean), std=tuple(float(x) for x in d.std))

  def with_tta(self) -> 'InferenceSpec':
    """These settings with multi-scale and flip test-time augmentation on (`predict --tta`)."""
    return dataclasses.replace(self, multi_scale=True, flip=True)

  @property
  def ratios(self) -> Tuple[float, ...]:
    """The scale ratios averaged over: `scales` with multi-scale TTA, else (1.0,)."""
    return self.scales if self.multi_scale else (1.0,)

  @property
  def flips(self) -> Tuple[bool, ...]:
    """(False, True) with flip TTA, else (False,)."""
    return (False, True) if self.multi_scale and self.flip else (False,)

  def scaled_bucket(self, bucket: Tuple[int, int], ratio: float) -> Tuple[int, int]:
    """The static bucket of a batch's images at `ratio`, given their scale-1 `bucket`."""
    return scaled_bucket(bucket, self.test_img_scale, ratio, self.test_min_size,
                         self.crop_size if self.mode == 'slide' else (0, 0))


# --------------------------------------------------------------------------------------------
# Resizing between traced sizes.


def dynamic_bilinear_taps(out_size: jnp.ndarray, in_size: jnp.ndarray, out_max: int
                          ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """PyTorch's bilinear resize (align_corners=False) along one axis, for traced sizes, as taps.

  Output entry d (< out_max) = w_lo[d] * in[lo[d]] + w_hi[d] * in[hi[d]]: the first `in_size`
  entries are mapped to the first `out_size`; entries at or beyond `out_size` get weight 0, and
  no entry at or beyond `in_size` is read. Same formula as `resize.bilinear_matrix` (source index
  (d + 0.5) * in / out - 0.5 clamped at 0, two taps), in float32 as PyTorch computes it.
  Returns (lo, hi) int32 and (w_lo, w_hi) float32, each (out_max,).
  """
  out_size = jnp.maximum(jnp.asarray(out_size, jnp.int32), 1)
  in_size = jnp.maximum(jnp.asarray(in_size, jnp.int32), 1)
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  dst = jnp.arange(out_max, dtype=jnp.float32)
  src = jnp.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  hi = jnp.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(jnp.float32)
  inside = jnp.arange(out_max) < out_size
  return lo, hi, jnp.where(inside, 1.0 - frac, 0.0), jnp.where(inside, frac, 0.0)


def _interpolate_axis(x: jnp.ndarray, taps, axis: int) -> jnp.ndarray:
  lo, hi, w_lo, w_hi = taps
  shape = [1] * x.ndim
  shape[axis] = -1
  # The taps are in range by construction; 'clip' spares the out-of-range select on the data.
  return (jnp.take(x, lo, axis=axis, mode='clip') * w_lo.reshape(shape)
          + jnp.take(x, hi, axis=axis, mode='clip') * w_hi.reshape(shape))


def resize_bilinear_dynamic(x: jnp.ndarray, in_size: jnp.ndarray, out_size: jnp.ndarray,
                            out_shape: Tuple[int, int]) -> jnp.ndarray:
  """Per-image bilinear resize of the valid region of a padded batch.

  Args:
    x: (B, H, W, C); image b occupies x[b, :in_size[b, 0], :in_size[b, 1]].
    in_size: (B, 2) int32 (h, w), traced.
    out_size: (B, 2) int32 (h, w), traced, at most `out_shape`.
    out_shape: static (Ho, Wo) bucket of the result.
  Returns:
    (B, Ho, Wo, C) float32; image b's resized pixels in [:out_size[b, 0], :out_size[b, 1]],
    zeros elsewhere.

  Two taps gathered per output row and column, width first and then height as PyTorch's kernel
  nests them: O(Ho Wo C) work, where interpolation matrices would cost O((H + W) Ho Wo C) (1.8 s
  of 9 s for an ADE-sized sliding-window batch on 2 CPU cores; HIGHEST-precision matmuls on TPU).
  """
  ho, wo = out_shape

  def one(image, size_in, size_out):
    image = _interpolate_axis(image, dynamic_bilinear_taps(size_out[1], size_in[1], wo), axis=1)
    return _interpolate_axis(image, dynamic_bilinear_taps(size_out[0], size_in[0], ho), axis=0)

  return jax.vmap(one)(x.astype(jnp.float32), jnp.asarray(in_size, jnp.int32),
                       jnp.asarray(out_size, jnp.int32))


def flip_valid(x: jnp.ndarray, widths: jnp.ndarray) -> jnp.ndarray:
  """Mirrors x[b, :, :widths[b]] horizontally in place; columns beyond the width become 0.

  x: (B, H, W, ...), widths: (B,) int32 traced. mmseg flips the unpadded image; flipping the
  whole bucket would move the padding to the left.
  """
  w = x.shape[2]
  src = widths[:, None] - 1 - jnp.arange(w)[None, :]  # (B, W)
  inside = src >= 0
  gathered = jax.vmap(lambda xi, si: jnp.take(xi, si, axis=1))(x, jnp.clip(src, 0, w - 1))
  mask = inside.reshape(inside.shape[0], 1, w, *([1] * (x.ndim - 3)))
  return jnp.where(mask, gathered, jnp.zeros((), x.dtype))


def _ratio_scale(img_scale: Sequence[int], ratio: float) -> Tuple[int, int]:
  """mmseg's MultiScaleFlipAug scale at `ratio` (`mmseg_rules.ratio_scale`), as Python ints."""
  scale = mmseg_rules.ratio_scale(img_scale, ratio)
  return int(scale[0]), int(scale[1])


def scaled_bucket(bucket: Tuple[int, int], img_scale: Sequence[int], ratio: float,
                   min_size: int, min_shape: Tuple[int, int]) -> Tuple[int, int]:
  """A static bucket holding every image's size at `ratio` given its scale-1 size fits `bucket`.

  The size at a ratio is the scale-1 size times f = (scale factor at ratio) / (scale factor at 1),
  at most max(long_r / long, short_r / short) (or max(short_r, min) / max(short, min)), plus
  rounding of both sizes.
  """
  long_1, short_1 = max(img_scale), min(img_scale)
  long_r, short_r = max(_ratio_scale(img_scale, ratio)), min(_ratio_scale(img_scale, ratio))
  if min_size > 0:
    f = max(short_r, min_size) / max(short_1, min_size)
  else:
    f = max(long_r / long_1, short_r / short_1)

  def one(side, minimum):
    n = math.ceil((side + 1) * f + 1)
    n = -(-n // _BUCKET_MULTIPLE) * _BUCKET_MULTIPLE
    return max(n, minimum)

  return one(bucket[0], min_shape[0]), one(bucket[1], min_shape[1])


# --------------------------------------------------------------------------------------------
# Inference on a padded batch.


def window_count(size, crop: int, stride: int):
  """mmseg's number of sliding windows along one axis, max(size - crop + stride - 1, 0) // stride
  + 1 (mmseg/models/segmentors/encoder_decoder.py, `slide_inference`).

  `size`: a Python int (returns an int: static window counts) or an int array, traced or not.
  """
  if isinstance(size, (int, np.integer)):
    return max(int(size) - crop + stride - 1, 0) // stride + 1
  return jnp.maximum(size - crop + stride - 1, 0) // stride + 1


def slide_inference(score_fn: ScoreFn, images: jnp.ndarray, image_size: jnp.ndarray, *,
                    crop_size: Tuple[int, int], stride: Tuple[int, int],
                    num_classes: int) -> jnp.ndarray:
  """Sliding-window scores averaged per pixel: (B, Hb, Wb, K) float32.

  Args:
    score_fn: crops (B, ch, cw, 3) -> scores (B, ch, cw, K); the model's eval forward.
    images: (B, Hb, Wb, 3) normalised, image b in [:image_size[b, 0], :image_size[b, 1]].
    image_size: (B, 2) int32 (h, w), traced.
    crop_size, stride: static (h, w) of the windows and their step.
    num_classes: K.

  Per image, mmseg's grid: h_grids = max(h - ch + sh - 1, 0) // sh + 1 windows, window i starting
  at min(i * sh, max(h - ch, 0)) (the last one is moved back to end at the border); the same
  along w. Scores are summed over windows and divided by the per-pixel window count. Values
  outside an image's (h, w) are meaningless.

  Windows are visited one grid position at a time (a `lax.scan` over positions, all images of
  the batch together): one model call on B crops per step bounds memory to a single forward of
  the eval batch, and keeps the batch dimension (sharded over the data axes) as the only batch
  dimension of the model, where one call on all B x windows crops would hold every window's
  activations at once. Positions beyond every image's grid are skipped with `lax.cond`.
  """
  ch, cw = (int(s) for s in crop_size)
  sh, sw = (int(s) for s in stride)
  if min(ch, cw, sh, sw) <= 0:
    raise ValueError(f'slide_inference: crop_size {crop_size} and stride {stride} must be > 0.')
  b, hb, wb, c = images.shape
  # A bucket smaller than the crop: pad so that one full crop fits (see the module docstring).
  hp, wp = max(hb, ch), max(wb, cw)
  if (hp, wp) != (hb, wb):
    images = jnp.pad(images, ((0, 0), (0, hp - hb), (0, wp - wb), (0, 0)))
  image_size = jnp.asarray(image_size, jnp.int32)
  h, w = image_size[:, 0], image_size[:, 1]
  grid_h, grid_w = window_count(h, ch, sh), window_count(w, cw, sw)
  max_h, max_w = window_count(hp, ch, sh), window_count(wp, cw, sw)

  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (ch, cw, c)))

  def add(canvas, y, x, values):
    region = jax.lax.dynamic_slice(canvas, (y, x, 0), values.shape)
    return jax.lax.dynamic_update_slice(canvas, region + values, (y, x, 0))

  add = jax.vmap(add)

  def window(carry, position):
    i, j = position // max_w, position % max_w
    active = (i < grid_h) & (j < grid_w)  # (B,)

    def run(carry):
      sums, counts = carry
      y = jnp.maximum(jnp.minimum(i * sh, h - ch), 0)
      x = jnp.maximum(jnp.minimum(j * sw, w - cw), 0)
      scores = score_fn(crop(images, y, x))
      if scores.shape != (b, ch, cw, num_classes):
        raise ValueError(f'slide_inference: score_fn returned {scores.shape} for crops '
                         f'{(b, ch, cw, c)}; expected {(b, ch, cw, num_classes)}.')
      weight = active.astype(jnp.float32)[:, None, None, None]
      sums = add(sums, y, x, scores.astype(jnp.float32) * weight)
      counts = add(counts, y, x, jnp.broadcast_to(weight, (b, ch, cw, 1)))
      return sums, counts

    return jax.lax.cond(jnp.any(active), run, lambda carry: carry, carry), None

  init = (jnp.zeros((b, hp, wp, num_classes), jnp.float32), jnp.zeros((b, hp, wp, 1), jnp.float32))
  (sums, counts), _ = jax.lax.scan(window, init, jnp.arange(max_h * max_w))
  return (sums / jnp.maximum(counts, 1.0))[:, :hb, :wb]


def whole_inference(score_fn: ScoreFn, images: jnp.ndarray) -> jnp.ndarray:
  """The model on the whole padded batch: (B, Hb, Wb, K) float32 (padding included)."""
  return score_fn(images).astype(jnp.float32)


def predict_probs(score_fn: ScoreFn, batch: Dict[str, jnp.ndarray], spec: InferenceSpec, *,
                  output_shape: Optional[Tuple[int, int]] = None) -> jnp.ndarray:
  """Class probabilities at the original resolution, averaged over augmentations.

  Args:
    score_fn: images (N, H, W, 3) -> scores (N, H, W, K); the model's eval forward.
    batch: the eval batch: 'image' (B, Hb, Wb, 3), 'image_size' (B, 2), 'label_size' (B, 2);
      with multi-scale ratios other than 1, 'scaled_size' (B, len(spec.scales), 2), the
      test-resized (h, w) at each ratio.
    spec: the inference settings.
    output_shape: static (Hl, Wl) bucket of the result; default: batch['label'].shape[1:3].
  Returns:
    (B, Hl, Wl, K) float32 softmax probabilities, zero outside each image's label size.
  """
  images = batch['image']
  image_size = jnp.asarray(batch['image_size'], jnp.int32)
  label_size = jnp.asarray(batch['label_size'], jnp.int32)
  if output_shape is None:
    if 'label' not in batch:
      raise ValueError("predict: the batch has no 'label'; pass output_shape=(Hl, Wl).")
    output_shape = tuple(batch['label'].shape[1:3])
  num_classes, ratios, flips = spec.num_classes, spec.ratios, spec.flips
  if any(r != 1.0 for r in ratios):
    if batch.get('scaled_size') is None or batch['scaled_size'].shape[1:] != (len(ratios), 2):
      raise ValueError(f"config.eval.multi_scale: the batch needs 'scaled_size' (B, {len(ratios)}, "
                       '2), the test-resized size at each of config.eval.scales.')

  def infer(x, size):
    if spec.mode == 'whole':
      return whole_inference(score_fn, x)
    return slide_inference(score_fn, x, size, crop_size=spec.crop_size, stride=spec.stride,
                           num_classes=num_classes)

  total = jnp.zeros((images.shape[0], *output_shape, num_classes), jnp.float32)
  for index, ratio in enumerate(ratios):
    if ratio == 1.0:
      x, size = images, image_size
    else:
      bucket = spec.scaled_bucket(images.shape[1:3], ratio)
      size = jnp.asarray(batch['scaled_size'], jnp.int32)[:, index]
      size = jnp.minimum(size, jnp.asarray(bucket, jnp.int32))
      x = resize_bilinear_dynamic(images, image_size, size, bucket).astype(images.dtype)
    for flip in flips:
      xf = flip_valid(x, size[:, 1]) if flip else x
      scores = resize_bilinear_dynamic(infer(xf, size), size, label_size, output_shape)
      probs = jax.nn.softmax(scores, axis=-1)
      if flip:
        probs = flip_valid(probs, label_size[:, 1])
      total = total + probs
  inside = within_sizes(label_size, output_shape)
  return jnp.where(inside[..., None], total / (len(ratios) * len(flips)), 0.0)


def within_sizes(sizes: jnp.ndarray, shape: Tuple[int, int]) -> jnp.ndarray:
  """(B, H, W) bool: pixel within the image's (h, w); sizes (B, 2) int32, shape static (H, W)."""
  rows = jnp.arange(shape[0])[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(shape[1])[None, None, :] < sizes[:, 1, None, None]
  return rows & cols


def predict(score_fn: ScoreFn, batch: Dict[str, jnp.ndarray], spec: InferenceSpec, *,
            output_shape: Optional[Tuple[int, int]] = None) -> jnp.ndarray:
  """Predicted labels (B, Hl, Wl) int32 at the original resolution; 255 outside label_size.

  See `predict_probs` for the arguments; the argmax of the averaged softmax, as mmseg.
  """
  probs = predict_probs(score_fn, batch, spec, output_shape=output_shape)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  inside = within_sizes(jnp.asarray(batch['label_size'], jnp.int32), probs.shape[1:3])
  return jnp.where(inside, labels, mmseg_rules.IGNORE_LABEL)
