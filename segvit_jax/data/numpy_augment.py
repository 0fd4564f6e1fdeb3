"""mmseg 0.24's transforms (mmseg/datasets/pipelines/transforms.py) in numpy, one example at a
time: the train transform from its uniforms, and the test transform into the static eval buckets.

The rules are `mmseg_rules`', the ones `augment` applies in TF: Resize(img_scale, ratio_range,
keep_ratio) with cv2 INTER_LINEAR for the image (bit for bit) and INTER_NEAREST for the label,
RandomCrop with cat_max_ratio, RandomFlip, PhotoMetricDistortion, Normalize, Pad. Only the crop
window of the resized image is computed. Fed the same uniforms as `augment.train_transform`,
`train_transform` gives its output, bit for bit as measured on TensorFlow 2.21:
PhotoMetricDistortion keeps augment's integer-valued float32 pixels floored after each step, and
its saturation / hue steps compute in continuous HSV as TensorFlow's CPU kernels of
`tf.image.adjust_saturation` / `adjust_hue` do (`adjust_saturation`, `adjust_hue`), then round as
augment does. Numpy only: `numpy_pipeline` applies them without TensorFlow.
"""

from typing import Any, Mapping, Sequence

import numpy as np

from segvit_jax.data import mmseg_rules
from segvit_jax.data.mmseg_rules import CROP_TRIES, IGNORE_LABEL
from segvit_jax.errors import UserError


# ---------------------------------------------------------------------------------------------
# PhotoMetricDistortion's HSV steps as TensorFlow computes them (float32, CPU kernels).


def _hsv_to_rgb(h, s, v) -> np.ndarray:
  """TensorFlow's `hsv_to_rgb` of adjust_saturation_op.cc, float32: h in [0, 1], s, v."""
  f32 = np.float32
  c = s * v
  m = v - c
  dh = h * f32(6)
  sextant = dh.astype(np.int32)  # truncation; dh == 6 (h rounded up to 1) has no sextant: 0s
  # The kernel's fmod(dh, 2) by loops: up to 0 -> 2, then -2 while >= 2 (dh <= 6: 3 times).
  f = np.where(dh <= 0, dh + f32(2), dh)
  for _ in range(3):
    f = np.where(f >= 2, f - f32(2), f)
  x = c * (f32(1) - np.abs(f - f32(1)))
  zero = np.zeros_like(c)
  table = ((c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x))
  masks = [sextant == k for k in range(6)]
  return np.stack([np.select(masks, [t[i] for t in table], f32(0)) + m for i in range(3)], -1)


def adjust_saturation(image: np.ndarray, factor) -> np.ndarray:
  """`tf.image.adjust_saturation` of float32 RGB (..., 3) on TensorFlow's CPU: to HSV (H in
  [0, 1)), S * factor clipped to [0, 1], back to RGB; float32 as the kernel computes it."""
  f32 = np.float32
  r, g, b = (image[..., i] for i in range(3))
  v = np.maximum(r, np.maximum(g, b))
  spread = v - np.minimum(r, np.minimum(g, b))
  with np.errstate(divide='ignore', invalid='ignore'):
    s = np.where(v > 0, spread / v, f32(0))
    norm = f32(1) / (f32(6) * spread)
    # The kernel adds 2/6 and 4/6 as doubles: the float32 product, a double sum, one rounding.
    h = np.where(r == v, norm * (g - b), np.where(
        g == v, (norm * (b - r)).astype(np.float64) + 2.0 / 6.0,
        (norm * (r - g)).astype(np.float64) + 4.0 / 6.0).astype(f32))
  h = np.where(spread <= 0, f32(0), h)  # grey: the kernel's 0 * inf is replaced by 0
  h = np.where(h < 0, h + f32(1), h)
  s = np.minimum(f32(1), np.maximum(f32(0), s * f32(factor)))
  return _hsv_to_rgb(h, s, v)


def adjust_hue(image: np.ndarray, delta) -> np.ndarray:
  """`tf.image.adjust_hue` of float32 RGB (..., 3) on TensorFlow's CPU (adjust_hue_op.cc): the
  hue as sextant + fraction in [0, 6) between the min and max channel, shifted by 6 * delta
  (`delta` in turns, [-1, 1]); float32 as the kernel computes it."""
  f32 = np.float32
  r, g, b = (image[..., i] for i in range(3))
  # The sextant from the channel order, ties broken as the kernel's if / else chain does.
  r_lt_g = r < g
  order = [r_lt_g & (b < r), r_lt_g & (b > g), r_lt_g, b < g, b > r]
  sextant = np.select(order, [1, 3, 2, 0, 4], 5)
  v_max = np.select(order, [g, b, g, r, b], r)
  v_mid = np.select(order, [r, g, b, g, r], b)
  v_min = np.select(order, [b, r, r, b, g], g)
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = (v_mid - v_min) / (v_max - v_min)
  h = sextant.astype(f32) + np.where(sextant % 2 == 0, ratio, f32(1) - ratio)
  h = np.where(v_max == v_min, f32(0), h)
  h = h + f32(delta) * f32(6)
  # The kernel's while loops into [0, 6): twice each covers any delta in [-1, 1].
  for _ in range(2):
    h = np.where(h < 0, h + f32(6), h)
  for _ in range(2):
    h = np.where(h >= 6, h - f32(6), h)
  sextant = h.astype(np.int32)
  ratio = h - sextant.astype(f32)
  ratio = np.where(sextant % 2 == 0, ratio, f32(1) - ratio)
  v_mid = v_min + ratio * (v_max - v_min)
  table = ((v_max, v_mid, v_min), (v_mid, v_max, v_min), (v_min, v_max, v_mid),
           (v_min, v_mid, v_max), (v_mid, v_min, v_max))
  masks = [sextant == k for k in range(5)]  # 5 and anything else: (max, min, mid)
  default = (v_max, v_min, v_mid)
  return np.stack([np.select(masks, [t[i] for t in table], default[i]) for i in range(3)], -1)


def photometric_distortion(image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
  """mmseg 0.24 PhotoMetricDistortion on (h, w, 3) float32 RGB holding integers in [0, 255].

  `params`: `mmseg_rules.photometric_params`. Order: brightness, contrast (if contrast_first),
  saturation, hue, contrast (otherwise); each step clips and truncates as mmseg's uint8 images
  do; saturation and hue in TensorFlow's continuous HSV, rounded (`augment`'s rule).
  """
  p = params

  def contrast(x):
    return mmseg_rules.convert_pixels(x, alpha=p['contrast']) if p['contrast_on'] else x

  x = image
  if p['brightness_on']:
    x = mmseg_rules.convert_pixels(x, beta=p['brightness'])
  if p['contrast_first']:
    x = contrast(x)
  if p['saturation_on']:
    x = mmseg_rules.round_pixels(adjust_saturation(x, p['saturation']))
  if p['hue_on']:
    x = mmseg_rules.round_pixels(adjust_hue(x, np.float32(p['hue']) / np.float32(180)))
  if not p['contrast_first']:
    x = contrast(x)
  return x


# ---------------------------------------------------------------------------------------------
# Train transform of one example.


def pad_bottom_right(x: np.ndarray, size: Sequence[int], value) -> np.ndarray:
  """`x` padded at the bottom / right of its first two dims to `size` with `value` (mmseg Pad)."""
  h, w = x.shape[:2]
  if (h, w) == tuple(size):
    return x
  out = np.full(tuple(size) + x.shape[2:], value, x.dtype)
  out[:h, :w] = x
  return out


def _crop_ok(window: np.ndarray, cat_max_ratio: float) -> bool:
  counts = np.bincount(window.ravel(), minlength=256)
  counts[IGNORE_LABEL] = 0  # mmseg counts the classes without ignore_index
  return bool(mmseg_rules.crop_accepted(counts, cat_max_ratio))


def choose_crop(label: np.ndarray, new_hw: Sequence[int], crop_hw: Sequence[int],
                offsets: np.ndarray, cat_max_ratio: float):
  """mmseg RandomCrop's choice among (CROP_TRIES + 1, 2) candidate (y0, x0) offsets.

  The first of the first CROP_TRIES candidates whose crop of the resized label passes
  `mmseg_rules.crop_accepted`, else the last one, unchecked (mmseg keeps the box it draws after
  the 10th rejection); with cat_max_ratio >= 1 the first, unchecked. `label` (H, W) is the label
  BEFORE resizing to `new_hw`: crops read it through cv2's nearest rule.

  Returns:
    ((y0, x0) ints, the (min(crop_h, new_h), min(crop_w, new_w)) window of the resized label).
  """
  ch, cw = min(crop_hw[0], new_hw[0]), min(crop_hw[1], new_hw[1])
  rows = mmseg_rules.nearest_source_index(np.arange(new_hw[0]), label.shape[0], new_hw[0])
  cols = mmseg_rules.nearest_source_index(np.arange(new_hw[1]), label.shape[1], new_hw[1])

  def window(k):
    y0, x0 = int(offsets[k][0]), int(offsets[k][1])
    return (y0, x0), label[np.ix_(rows[y0:y0 + ch], cols[x0:x0 + cw])]

  if cat_max_ratio >= 1.0:
    return window(0)
  for k in range(CROP_TRIES):
    y0x0, win = window(k)
    if _crop_ok(win, cat_max_ratio):
      return y0x0, win
  return window(CROP_TRIES)


def train_transform(image: np.ndarray, label: np.ndarray, u: np.ndarray, *,
                    crop_size: Sequence[int], img_scale: Sequence[int],
                    ratio_range: Sequence[float], cat_max_ratio: float, flip_prob: float,
                    photometric: bool, mean: Sequence[float], std: Sequence[float],
                    min_size: int = 0) -> dict[str, np.ndarray]:
  """mmseg's training transform of one example, from its uniforms: a pure function.

  Args:
    image: (H, W, 3) uint8 RGB.  label: (H, W) uint8 (255 = ignore).
    u: (NUM_UNIFORMS,) uniforms in [0, 1) (`numpy_pipeline.example_uniforms`;
      `augment.example_uniforms` gives augment.train_transform's, so the two can be compared).
    The rest: config.dataset's (as augment.train_transform).
  Returns:
    {'image': (Ch, Cw, 3) float32 normalised, 0 in the padding;
     'label': (Ch, Cw) int32, 255 in the padding}, (Ch, Cw) = crop_size.
  """
  image, label = np.asarray(image), np.asarray(label)
  if image.shape[:2] != label.shape[:2]:
    raise ValueError(f'train_transform: image and label sizes differ: {image.shape[:2]} vs '
                     f'{label.shape[:2]}.')
  u = np.asarray(u, np.float64)
  scale = mmseg_rules.random_scale(u[mmseg_rules.SLOT_RATIO], img_scale, ratio_range)
  new_hw = tuple(int(s) for s in mmseg_rules.rescale_size(label.shape[:2], scale, min_size))
  offsets = mmseg_rules.crop_offsets(u[mmseg_rules.SLOT_CROP:].reshape(CROP_TRIES + 1, 2),
                                     new_hw, crop_size)
  (y0, x0), lab = choose_crop(label, new_hw, crop_size, offsets, cat_max_ratio)
  rows, cols = y0 + np.arange(lab.shape[0]), x0 + np.arange(lab.shape[1])
  if u[mmseg_rules.SLOT_FLIP] < flip_prob:
    cols, lab = cols[::-1], lab[:, ::-1]  # the flipped crop, read directly
  img = mmseg_rules.resize_linear_window(image, new_hw, rows, cols).astype(np.float32)
  if photometric:
    img = photometric_distortion(img, mmseg_rules.photometric_params(u))
  img = mmseg_rules.normalize(img, mean, std)
  return {'image': pad_bottom_right(img, crop_size, 0.0),
          'label': pad_bottom_right(lab.astype(np.int32), crop_size, IGNORE_LABEL)}


# ---------------------------------------------------------------------------------------------
# Test transform of one example.


def eval_transform(image: np.ndarray, label: np.ndarray, *, img_scale: Sequence[int],
                   min_size: int, mean: Sequence[float], std: Sequence[float],
                   pad_size: Sequence[int], label_pad_size: Sequence[int],
                   scales: Sequence[float] = (1.0,), name: str = '') -> dict[str, np.ndarray]:
  """The test transform of one example, padded to the static buckets (tf_pipeline.eval_transform).

  Returns {'image': pad_size + (3,) float32, test-resized (mmseg Resize(keep_ratio=True),
  cv2 INTER_LINEAR), normalised, 0-padded; 'image_size': (2,) int32 resized (h, w);
  'scaled_size': (len(scales), 2) int32 resized (h, w) at each test ratio (MultiScaleFlipAug);
  'label': label_pad_size int32 at the original size, 255-padded; 'label_size': (2,) int32;
  'valid': True}. A UserError naming the example and the config key when a resized image or an
  original label does not fit its bucket: never crops silently.
  """
  image_hw = image.shape[:2]
  new_hw = tuple(int(s) for s in mmseg_rules.rescale_size(image_hw, img_scale, min_size))
  for key, size, bucket in (('eval_pad_size', new_hw, pad_size),
                            ('eval_label_pad_size', label.shape[:2], label_pad_size)):
    if size[0] > bucket[0] or size[1] > bucket[1]:
      what = 'resized image' if key == 'eval_pad_size' else 'label'
      raise UserError(f'Eval example {name}: its {what} (h, w)={tuple(size)} does not fit '
                      f'config.dataset.{key}={tuple(bucket)}; raise that bucket.')
  resized = mmseg_rules.resize_linear(image, new_hw).astype(np.float32)
  scaled = [mmseg_rules.rescale_size(image_hw, mmseg_rules.ratio_scale(img_scale, float(r)),
                                     min_size) for r in scales]
  return {
      'image': pad_bottom_right(mmseg_rules.normalize(resized, mean, std), pad_size, 0.0),
      'image_size': np.asarray(new_hw, np.int32),
      'scaled_size': np.asarray(scaled, np.int32).reshape(len(scales), 2),
      'label': pad_bottom_right(np.asarray(label, np.int32), label_pad_size, IGNORE_LABEL),
      'label_size': np.asarray(label.shape[:2], np.int32),
      'valid': np.bool_(True),
  }
