"""mmseg 0.24 training / test transforms as pure TensorFlow ops (graph mode, one example at a time).

Layouts: images HWC, RGB, uint8 on input; labels HW uint8 train ids with 255 = ignore.

The official train pipeline is
  Resize(img_scale, ratio_range, keep_ratio) -> RandomCrop(crop, cat_max_ratio=0.75)
  -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize -> Pad(crop, 0, seg 255).
Here resize, crop and flip are fused into one gather: only the crop window of the resized image is
ever computed, so the cost does not grow with the resize ratio. The sampled pixels are exactly
those of "resize the whole image, then crop, then flip".

Decoding, resize arithmetic, normalisation and the ignore label are mmseg's rules from
`segvit_jax.data.mmseg_rules` (the one definition, shared with evaluation and prediction), applied here
to tensors:
- Decoding: `decode_image` / `decode_label` give `mmseg_rules.decode_image` / `decode_label`'s
  pixels (OpenCV's IMREAD_COLOR): with TensorFlow's decoders where they are the same, through
  `tf.numpy_function` where they are not (EXIF orientation, CMYK).
- Image resize: cv2 INTER_LINEAR, bit for bit (OpenCV's fixed-point weights and integer passes).
- Label resize: cv2 INTER_NEAREST, source index floor(dst * in / out) (top-left rule).

PhotoMetricDistortion works on uint8 in mmseg: each step clips to [0, 255] and truncates. We keep
float32 tensors holding integer values and floor after each step. Saturation and hue use
`tf.image.adjust_saturation` / `adjust_hue` in continuous HSV instead of OpenCV's 8-bit HSV
(H quantised to 2 degrees, S to 1/255), then round: a pixel can differ by a few grey levels.

Randomness: every random decision of one example comes from a single stateless draw keyed by a
(2,) int seed, so an example is reproducible from (seed, its global stream position) alone.
"""

from typing import Mapping, Sequence

import tensorflow as tf

from segvit_jax.data import mmseg_rules
# The draw's constants and slot layout live in mmseg_rules (TF-free), shared with
# `numpy_pipeline`; they stay importable from here.
from segvit_jax.data.mmseg_rules import (  # noqa: F401  # pylint: disable=unused-import
    BRIGHTNESS_DELTA, CONTRAST_RANGE, CROP_TRIES, HUE_DELTA, NUM_UNIFORMS, SATURATION_RANGE)

_RATIO, _FLIP, _CROP = mmseg_rules.SLOT_RATIO, mmseg_rules.SLOT_FLIP, mmseg_rules.SLOT_CROP


def example_uniforms(seed) -> tf.Tensor:
  """(NUM_UNIFORMS,) float64 in [0, 1): all random numbers of one example, from a (2,) int seed."""
  seed = tf.cast(seed, tf.int64)
  return tf.random.stateless_uniform([NUM_UNIFORMS], seed=seed, dtype=tf.float64)


# ---------------------------------------------------------------------------------------------
# Decoding (mmseg LoadImageFromFile / LoadAnnotations).


_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_EXIF_MARKERS = (b'Exif\x00\x00', b'eXIf')  # a JPEG APP1 segment / a PNG chunk


def _is_jpeg(data):
  return tf.equal(tf.strings.substr(data, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)


def _is_png(data):
  return tf.equal(tf.strings.substr(data, 0, len(_PNG_MAGIC)), _PNG_MAGIC)


def _contains(data, marker: bytes):
  return tf.size(tf.strings.split(data, sep=marker)) > 1


def tf_decodes_as_opencv(data) -> tf.Tensor:
  """Whether TensorFlow's own decoders give `mmseg_rules.decode_image`'s pixels for these bytes.

  They do (checked in tests against OpenCV) for a JPEG with 1 or 3 components decoded with
  dct_method='INTEGER_ACCURATE' (libjpeg's accurate integer IDCT, fancy upsampling, as OpenCV),
  and for any PNG (grey / palette expanded, alpha dropped, 16 bits to the high byte, as OpenCV),
  unless the file has an EXIF block, whose orientation OpenCV applies and TensorFlow does not.
  Not for CMYK JPEGs (OpenCV's own conversion) or other formats.
  """
  is_jpeg, is_png = _is_jpeg(data), _is_png(data)
  no_exif = tf.logical_not(tf.logical_or(*[_contains(data, m) for m in _EXIF_MARKERS]))
  components_ok = tf.cond(is_jpeg, lambda: tf.not_equal(tf.io.extract_jpeg_shape(data)[2], 4),
                          lambda: tf.constant(True))
  return tf.logical_and(tf.logical_or(is_png, tf.logical_and(is_jpeg, components_ok)), no_exif)


def decode_image(data) -> tf.Tensor:
  """(H, W, 3) uint8 RGB of encoded image bytes (tf.string scalar): `mmseg_rules.decode_image`.

  In the graph: TensorFlow's decoders where they give the same pixels (`tf_decodes_as_opencv`:
  nearly every dataset file, at C++ speed and without the GIL), `mmseg_rules.decode_image`
  through `tf.numpy_function` for the rest (EXIF-oriented and CMYK files, other formats).
  """
  def native():
    return tf.cond(_is_jpeg(data),
                   lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
                   lambda: tf.io.decode_png(data, channels=3, dtype=tf.uint8))

  def rules():
    return tf.numpy_function(mmseg_rules.decode_image, [data], tf.uint8, stateful=False)

  image = tf.cond(tf_decodes_as_opencv(data), native, rules)
  image.set_shape([None, None, 3])
  return image


def decode_label(data) -> tf.Tensor:
  """(H, W) uint8 of an encoded label map (tf.string scalar): `mmseg_rules.decode_label`.

  8-bit grey PNGs (every label a TFDS build writes) decode natively; others (palette PNGs,
  whose indices TensorFlow would turn into grey levels) through `mmseg_rules.decode_label`.
  """
  grey8 = tf.logical_and(_is_png(data),
                         tf.equal(tf.strings.substr(data, 24, 2), b'\x08\x00'))  # IHDR

  def native():
    return tf.io.decode_png(data, channels=1)[..., 0]

  def rules():
    return tf.numpy_function(mmseg_rules.decode_label, [data], tf.uint8, stateful=False)

  label = tf.cond(grey8, native, rules)
  label.set_shape([None, None])
  return label


# ---------------------------------------------------------------------------------------------
# Resize (mmseg Resize with ratio_range, keep_ratio=True; OpenCV's rules from `mmseg_rules`).


def sample_scale(u, img_scale: Sequence[int], ratio_range: Sequence[float]) -> tf.Tensor:
  """mmseg `random_sample_ratio`: (int(img_scale[0] * r), int(img_scale[1] * r)), float64 (2,).

  `u` is a uniform [0, 1) draw; r = u * (max - min) + min (`mmseg_rules.random_scale`).
  """
  return tf.stack(mmseg_rules.random_scale(u, img_scale, ratio_range, xp=tf))


def resized_size(hw, scale, min_size: int = 0) -> tf.Tensor:
  """(2,) int32 (h, w) of an image of size `hw` under mmseg Resize(keep_ratio=True, min_size)."""
  return tf.stack(mmseg_rules.rescale_size((hw[0], hw[1]), scale, min_size, xp=tf))


def resize_window_linear(image, new_hw, rows, cols) -> tf.Tensor:
  """Pixels (rows x cols) of uint8 `image` resized to `new_hw` by cv2 INTER_LINEAR, bit for bit.

  Only the window is computed, never the full resize (`mmseg_rules.resize_linear` is the
  whole-image form of the same taps and passes).

  Args:
    image: (H, W, C) uint8.
    new_hw: (2,) the resized (h, w).
    rows, cols: int vectors of output positions in the resized image (any order: a reversed
      `cols` gives a horizontally flipped window).
  Returns:
    (len(rows), len(cols), C) float32 holding OpenCV's uint8 values.
  """
  in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
  r_lo, r_hi, r_wlo, r_whi = mmseg_rules.linear_taps(rows, in_h, new_hw[0], horizontal=False,
                                                     xp=tf)
  c_lo, c_hi, c_wlo, c_whi = mmseg_rules.linear_taps(cols, in_w, new_hw[1], horizontal=True,
                                                     xp=tf)
  # Columns first, on the rows the window needs, transposed so that both passes gather whole
  # rows along axis 0 (a middle-axis gather of 3-channel pixels is much slower in TF).
  r0 = tf.reduce_min(r_lo)
  r1 = tf.reduce_max(r_hi) + 1
  source = tf.transpose(image[r0:r1], [1, 0, 2])  # (W, r1 - r0, C)
  left = tf.cast(tf.gather(source, c_lo), tf.int32)
  right = tf.cast(tf.gather(source, c_hi), tf.int32)
  sums = mmseg_rules.linear_columns(left, right, c_wlo[:, None, None], c_whi[:, None, None],
                                    xp=tf)
  sums = tf.transpose(sums, [1, 0, 2])  # (r1 - r0, cols, C)
  out = mmseg_rules.linear_rows(tf.gather(sums, r_lo - r0), tf.gather(sums, r_hi - r0),
                                r_wlo[:, None, None], r_whi[:, None, None], xp=tf)
  return tf.cast(out, tf.float32)


def resize_window_nearest(label, new_hw, rows, cols) -> tf.Tensor:
  """Pixels (rows x cols) of `label` (H, W) nearest-resized to `new_hw` (cv2 rule); dtype kept."""
  in_h, in_w = tf.shape(label)[0], tf.shape(label)[1]
  r = mmseg_rules.nearest_source_index(rows, in_h, new_hw[0], xp=tf)
  c = mmseg_rules.nearest_source_index(cols, in_w, new_hw[1], xp=tf)
  r0 = tf.reduce_min(r)
  source = tf.transpose(label[r0:tf.reduce_max(r) + 1])  # axis-0 gathers, as in the linear case
  return tf.gather(tf.transpose(tf.gather(source, c)), r - r0)


def round_pixels(x) -> tf.Tensor:
  """Round half up and clip to [0, 255], as OpenCV's saturate_cast to uint8 does; stays float32."""
  return mmseg_rules.round_pixels(x, xp=tf)


# ---------------------------------------------------------------------------------------------
# RandomCrop.


def crop_accepted(label_crop, cat_max_ratio: float, ignore_index: int = mmseg_rules.IGNORE_LABEL):
  """mmseg RandomCrop check: > 1 class present (ignoring 255) and max count / total < ratio."""
  counts = tf.math.bincount(tf.cast(tf.reshape(label_crop, [-1]), tf.int32),
                            minlength=256, maxlength=256, dtype=tf.int64)
  counts = counts * tf.cast(tf.range(256) != ignore_index, tf.int64)
  return mmseg_rules.crop_accepted(counts, cat_max_ratio, xp=tf)


def crop_offsets(u, new_hw, crop_hw: Sequence[int]) -> tf.Tensor:
  """(n, 2) int32 crop offsets from (n, 2) uniforms: randint(0, max(size - crop, 0) + 1)."""
  return mmseg_rules.crop_offsets(u, new_hw, crop_hw, xp=tf)


def choose_crop(label, new_hw, crop_hw: Sequence[int], offsets, cat_max_ratio: float):
  """mmseg RandomCrop's choice among candidate offsets (CROP_TRIES + 1, 2).

  The first candidate among the first CROP_TRIES whose crop of the resized label passes
  `crop_accepted`; if none passes, the last candidate (mmseg samples a new box after the 10th
  rejection and keeps it unchecked). With cat_max_ratio >= 1 the first candidate, unchecked.
  `label` is the label BEFORE resizing; crops are read through the nearest-resize rule.

  Returns:
    (y0, x0) int32 and the chosen (ch, cw) window of the resized label (ch = min(crop_h, new_h)),
    so that the caller does not gather it again.
  """
  offsets = tf.convert_to_tensor(offsets, tf.int32)
  new_hw = tf.convert_to_tensor(new_hw, tf.int32)
  ch = tf.minimum(crop_hw[0], new_hw[0])
  cw = tf.minimum(crop_hw[1], new_hw[1])

  def window(k):
    y0, x0 = offsets[k, 0], offsets[k, 1]
    return resize_window_nearest(label, new_hw, y0 + tf.range(ch), x0 + tf.range(cw))

  if cat_max_ratio >= 1.0:
    return offsets[0], window(0)

  def cond(k, done, win):
    del win
    return tf.logical_and(k < CROP_TRIES, tf.logical_not(done))

  def body(k, done, win):
    del done, win
    win = window(k)
    ok = crop_accepted(win, cat_max_ratio)
    return tf.where(ok, k, k + 1), ok, win

  start = (tf.constant(0), tf.constant(False), tf.zeros([ch, cw], label.dtype))
  k, ok, win = tf.while_loop(cond, body, start, maximum_iterations=CROP_TRIES,
                             shape_invariants=(tf.TensorShape([]), tf.TensorShape([]),
                                               tf.TensorShape([None, None])))
  win = tf.cond(ok, lambda: win, lambda: window(k))  # k == CROP_TRIES: the unchecked last box
  return offsets[k], win


# ---------------------------------------------------------------------------------------------
# PhotoMetricDistortion.


def photometric_params(u) -> dict[str, tf.Tensor]:
  """mmseg PhotoMetricDistortion draws from the example's uniforms (each step with p = 0.5)."""
  return mmseg_rules.photometric_params(u, xp=tf)


def photometric_distortion(image, params: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """mmseg 0.24 PhotoMetricDistortion on (h, w, 3) float32 RGB holding integers in [0, 255].

  Order: brightness, contrast (if contrast_first), saturation, hue, contrast (otherwise).
  Saturation and hue are invariant to the channel order, so RGB vs mmseg's BGR does not matter.
  """
  p = params

  def maybe(flag, fn, x):
    return tf.cond(flag, lambda: fn(x), lambda: x)

  def contrast(x):
    return maybe(p['contrast_on'],
                 lambda y: mmseg_rules.convert_pixels(y, alpha=p['contrast'], xp=tf), x)

  x = maybe(p['brightness_on'],
            lambda y: mmseg_rules.convert_pixels(y, beta=p['brightness'], xp=tf), image)
  x = maybe(p['contrast_first'], contrast, x)
  x = maybe(p['saturation_on'],
            lambda y: round_pixels(tf.image.adjust_saturation(y, p['saturation'])), x)
  x = maybe(p['hue_on'], lambda y: round_pixels(tf.image.adjust_hue(y, p['hue'] / 180.0)), x)
  x = maybe(tf.logical_not(p['contrast_first']), contrast, x)
  return x


# ---------------------------------------------------------------------------------------------
# Pad.


def pad_bottom_right(x, size: Sequence[int], value) -> tf.Tensor:
  """Pads the first two dims of `x` at the bottom / right up to the static `size` with `value`.

  `x` must not be larger than `size` (callers check and raise a message naming the example).
  """
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  paddings = [[0, size[0] - h], [0, size[1] - w]] + [[0, 0]] * (len(x.shape) - 2)
  # Most training crops need no padding: skip the copy then.
  out = tf.cond(tf.logical_and(tf.equal(h, size[0]), tf.equal(w, size[1])), lambda: x,
                lambda: tf.pad(x, paddings, constant_values=tf.cast(value, x.dtype)))
  out.set_shape(list(size) + list(x.shape[2:]))
  return out


# ---------------------------------------------------------------------------------------------
# Whole pipelines of one example.


def train_transform(image, label, seed, *, crop_size: Sequence[int], img_scale: Sequence[int],
                    ratio_range: Sequence[float], cat_max_ratio: float, flip_prob: float,
                    photometric: bool, mean: Sequence[float], std: Sequence[float],
                    min_size: int = 0) -> dict[str, tf.Tensor]:
  """The official training transform of one example.

  Args:
    image: (H, W, 3) uint8 RGB.  label: (H, W) uint8 (255 = ignore).
    seed: (2,) int, e.g. (config.seed, global example index).
  Returns:
    {'image': (Ch, Cw, 3) float32 normalised, 0 in the padding;
     'label': (Ch, Cw) int32, 255 in the padding}, (Ch, Cw) = crop_size.
  """
  u = example_uniforms(seed)
  hw = tf.shape(label)[:2]
  tf.debugging.Assert(tf.reduce_all(tf.equal(tf.shape(image)[:2], hw)),
                      ['train_transform: image and label sizes differ:', tf.shape(image), hw])
  scale = sample_scale(u[_RATIO], img_scale, ratio_range)
  new_hw = resized_size(hw, scale, min_size)
  offsets = crop_offsets(tf.reshape(u[_CROP:], [CROP_TRIES + 1, 2]), new_hw, crop_size)
  y0x0, lab = choose_crop(label, new_hw, crop_size, offsets, cat_max_ratio)
  flip = u[_FLIP] < flip_prob
  rows = y0x0[0] + tf.range(tf.shape(lab)[0])
  cols = y0x0[1] + tf.range(tf.shape(lab)[1])
  cols = tf.where(flip, tf.reverse(cols, [0]), cols)  # the flipped crop, read directly
  lab = tf.cond(flip, lambda: tf.reverse(lab, [1]), lambda: lab)
  img = resize_window_linear(image, new_hw, rows, cols)
  if photometric:
    img = photometric_distortion(img, photometric_params(u))
  img = mmseg_rules.normalize(img, mean, std, xp=tf)
  return {
      'image': pad_bottom_right(img, crop_size, 0.0),
      'label': pad_bottom_right(tf.cast(lab, tf.int32), crop_size, mmseg_rules.IGNORE_LABEL),
  }


def eval_resize(image, scale: Sequence[int], min_size: int = 0):
  """mmseg test-time Resize(keep_ratio=True) of (H, W, 3) uint8.

  Returns ((h', w', 3) float32 holding OpenCV's uint8 result, (2,) int32 (h', w')).
  """
  new_hw = resized_size(tf.shape(image)[:2], tuple(float(s) for s in scale), min_size)
  return resize_window_linear(image, new_hw, tf.range(new_hw[0]), tf.range(new_hw[1])), new_hw
