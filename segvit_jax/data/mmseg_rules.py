"""mmseg 0.24's image rules as mmcv and OpenCV compute them: decoding, test-resize sizes, bilinear
and nearest resize, normalisation, the ignore label. One definition of each, TF-free.

Training and evaluation (tf.data graphs through `augment`, or numpy in `numpy_pipeline`) and
prediction (numpy on the host) all call these functions, so every pixel the model sees is the
pixel mmseg would feed it:

- `decode_image`: mmseg's `LoadImageFromFile` (`mmcv.imfrombytes(flag='color', backend='cv2')`,
  i.e. `cv2.imdecode(IMREAD_COLOR)`, then BGR -> RGB as `Normalize(to_rgb=True)` does), written
  with Pillow, which decodes JPEG with the same libjpeg accurate integer IDCT as OpenCV. What
  IMREAD_COLOR does, measured on OpenCV 4.10: EXIF orientation applied (JPEG and PNG); grey and
  palette images expanded to 3 channels; alpha dropped (not composited); 16-bit samples reduced
  to their high byte (x >> 8, libpng's strip_16: no rounding); CMYK JPEGs converted by OpenCV's
  own formula. `decode_label` is mmseg's `LoadAnnotations` (Pillow, 'unchanged', as uint8).
- `rescale_size` / `ratio_scale`: mmseg `Resize(keep_ratio=True)` (+ SegViT's `min_size`) and
  mmcv `rescale_size`, in mmcv's float64 arithmetic; `ratio_scale` is `int(side * ratio)` of
  `Resize(ratio_range=...)` and `MultiScaleFlipAug(img_ratios=...)`.
- `linear_taps` + `linear_rows` / `linear_columns`: `cv2.resize(INTER_LINEAR)` of uint8 images,
  bit for bit: float32 source coordinates, 11-bit fixed-point weights and OpenCV's integer
  vertical pass with its truncating shifts (`VResizeLinearVec_32s8u`). `resize_linear` applies
  them to a whole numpy image, `resize_linear_window` to a window of it (`numpy_pipeline`'s
  crops); `augment.resize_window_linear` to a window inside a tf.data graph.
- `nearest_source_index`: `cv2.resize(INTER_NEAREST)` (labels).
- `normalize`: `mmcv.imnormalize`, with its float32 subtraction and float64 product.
- The train transform's random draws (one float64 vector of NUM_UNIFORMS uniforms per example, in
  the SLOT_* layout) and the rules that read them: `random_scale` (Resize(ratio_range)),
  `crop_offsets` / `crop_accepted` (RandomCrop), `photometric_params`, `convert_pixels` and
  `round_pixels` (PhotoMetricDistortion). `augment` (tf.data) and `numpy_pipeline` both apply
  them, so the two pipelines transform an example alike given the same uniforms.

The size and index arithmetic takes an array namespace `xp`: `numpy` on the host, `tensorflow`
inside tf.data graphs (traced sizes). Only functions both spell alike are used, plus `_cast` and
`_reduce`.
"""

import io
from typing import Any, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageOps

IGNORE_LABEL = 255  # mmseg's ignore_index: padding, "other" / unlabeled pixels

# OpenCV's INTER_RESIZE_COEF_BITS: uint8 resizes use weights in units of 1/2048.
_COEF_SCALE = 2048


def _shift_right(x, bits: int, xp):
  bitwise = getattr(xp, 'bitwise', None)  # tensorflow spells it tf.bitwise.right_shift
  return (bitwise.right_shift if bitwise is not None else xp.right_shift)(x, bits)


def _cast(x, dtype, xp):
  if xp is np:
    return np.asarray(x, dtype)
  if isinstance(x, (int, float)):  # tf.cast would convert a Python float through float32
    return xp.constant(x, dtype)
  return xp.cast(x, dtype)


# ---------------------------------------------------------------------------------------------
# Decoding.


def _cmyk_to_rgb(image: Image.Image) -> np.ndarray:
  # Pillow inverts JPEG CMYK ("CMYK;I", Adobe convention); OpenCV works on libjpeg's raw values
  # with c' = k - (255 - c) * k / 256 (grfmt_jpeg.cpp, icvCvt_CMYK2BGR_8u_C4C3R).
  raw = 255 - np.asarray(image).astype(np.int32)
  c, m, y, k = (raw[..., i] for i in range(4))
  rgb = [k - (((255 - v) * k) >> 8) for v in (c, m, y)]
  return np.stack(rgb, axis=-1).astype(np.uint8)


def image_to_rgb(image: Image.Image, in_place: bool = False) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a Pillow image, as `cv2.imdecode(IMREAD_COLOR)` would decode its file.

  Applies the EXIF orientation (to `image` itself if `in_place`), drops alpha, expands grey /
  palette images and keeps the high byte of 16-bit samples (Pillow already does so for 16-bit
  RGB(A) PNGs; 16-bit grey needs it here: Pillow's `convert('RGB')` would clip it to white).
  """
  fmt = image.format  # a transposed copy no longer knows it
  if in_place:
    ImageOps.exif_transpose(image, in_place=True)
  else:
    image = ImageOps.exif_transpose(image)
  mode = image.mode
  if mode == 'RGB':
    arr = np.asarray(image)
  elif mode.startswith('I;16') or mode == 'I':
    grey = np.asarray(image).astype(np.int64)
    grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
    arr = np.repeat(grey[..., None], 3, axis=-1)
  elif mode == 'CMYK' and fmt == 'JPEG':
    arr = _cmyk_to_rgb(image)
  elif mode in ('F', 'I;32', 'I;32B'):
    raise ValueError(f'unsupported image mode {mode!r} (expected 8- or 16-bit samples).')
  else:
    arr = np.asarray(image.convert('RGB'))
  if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
    raise ValueError(f'decoded to an empty or malformed image {arr.shape}.')
  return np.ascontiguousarray(arr, dtype=np.uint8)


def _as_bytes(data) -> bytes:
  # tf.numpy_function hands over a 0-d object array when run eagerly, bytes inside tf.data.
  return data.item() if isinstance(data, np.ndarray) else bytes(data)


def decode_image(data: bytes) -> np.ndarray:
  """(H, W, 3) uint8 RGB of encoded image bytes (JPEG, PNG, ...): mmseg's LoadImageFromFile.

  Raises OSError / ValueError with the reason for anything that is not a readable image.
  """
  with Image.open(io.BytesIO(_as_bytes(data))) as image:
    image.load()  # decodes now: truncated or corrupt data fails here
    return image_to_rgb(image, in_place=True)


def decode_label(data: bytes) -> np.ndarray:
  """(H, W) uint8 of an encoded label map: mmseg's LoadAnnotations (Pillow, 'unchanged').

  A palette PNG gives its indices, as in mmseg. Refused (ValueError): more than one channel and
  values above 255 (mmseg's `astype(np.uint8)` would wrap them silently).
  """
  with Image.open(io.BytesIO(_as_bytes(data))) as image:
    image.load()
    arr = np.asarray(image)
  if arr.ndim != 2:
    raise ValueError(f'a label map must have one channel; got shape {arr.shape} '
                     f'(mode {image.mode}).')
  if arr.dtype != np.uint8:
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise ValueError(f'label values must be 0..255; got {arr.min()}..{arr.max()}.')
    arr = arr.astype(np.uint8)
  return arr


# ---------------------------------------------------------------------------------------------
# Resize target sizes.


def ratio_scale(img_scale: Sequence[Any], ratio, xp=np) -> Tuple[Any, Any]:
  """(int(img_scale[0] * ratio), int(img_scale[1] * ratio)) as float64: mmseg's scale at a ratio.

  `random_sample_ratio` (training, a random ratio) and `MultiScaleFlipAug` (test ratios) both
  truncate; sides are positive, so truncation is floor.
  """
  ratio = _cast(ratio, xp.float64, xp)
  return (xp.floor(_cast(img_scale[0], xp.float64, xp) * ratio),
          xp.floor(_cast(img_scale[1], xp.float64, xp) * ratio))


def rescale_size(hw: Sequence[Any], scale: Sequence[Any], min_size: int = 0,
                 xp=np) -> Tuple[Any, Any]:
  """(new_h, new_w) int32 of an (h, w) image under mmseg `Resize(keep_ratio=True)`.

  Args:
    hw: the image's (h, w), Python ints or `xp` scalars.
    scale: the (long, short) bounds, either order (mmcv takes the max and the min).
    min_size: SegViT's `Resize(min_size=...)`: > 0 makes the short side max(min(scale),
      min_size) and the long side follow the aspect ratio, whatever max(scale) says.
    xp: numpy or tensorflow.

  mmcv: factor = min(max(scale) / max(h, w), min(scale) / min(h, w)), side = int(side * factor
  + 0.5), all in float64 and in mmcv's order of operations, so .5 ties land where mmcv's do.
  """
  h, w = _cast(hw[0], xp.float64, xp), _cast(hw[1], xp.float64, xp)
  s0, s1 = _cast(scale[0], xp.float64, xp), _cast(scale[1], xp.float64, xp)
  if min_size:
    short = xp.minimum(s0, s1)
    new_short = xp.where(short < float(min_size), _cast(float(min_size), xp.float64, xp), short)
    s0 = xp.where(h > w, new_short * h / w, new_short)
    s1 = xp.where(h > w, new_short, new_short * w / h)
  factor = xp.minimum(xp.maximum(s0, s1) / xp.maximum(h, w),
                      xp.minimum(s0, s1) / xp.minimum(h, w))
  return (_cast(xp.floor(h * factor + 0.5), xp.int32, xp),
          _cast(xp.floor(w * factor + 0.5), xp.int32, xp))


# ---------------------------------------------------------------------------------------------
# cv2.resize index rules, evaluated at any output positions (a window needs only its own).


def _inverse_scale(in_size, out_size, xp):
  # OpenCV: inv_scale = (double)out / in; scale = 1. / inv_scale.
  return 1.0 / (_cast(out_size, xp.float64, xp) / _cast(in_size, xp.float64, xp))


def nearest_source_index(dst, in_size, out_size, xp=np):
  """cv2 INTER_NEAREST source index of output positions `dst`: min(floor(dst * in/out), in - 1).

  The top-left rule, not half-pixel centres (resize.cpp, resizeNN). int32.
  """
  src = xp.floor(_cast(dst, xp.float64, xp) * _inverse_scale(in_size, out_size, xp))
  return xp.minimum(_cast(src, xp.int32, xp), _cast(in_size, xp.int32, xp) - 1)


def linear_taps(dst, in_size, out_size, *, horizontal: bool, xp=np):
  """cv2 INTER_LINEAR taps of output positions `dst` along one axis, for uint8 images.

  Returns (lo, hi) int32 source indices and (w_lo, w_hi) int32 weights in units of 1/2048.
  OpenCV (resize.cpp, resizeGeneric): f = float32((dst + 0.5) * in/out - 0.5), s = floor(f),
  weights round((1 - (f - s)) * 2048) and round((f - s) * 2048), taps clip(s) and clip(s + 1).
  Along x (`horizontal`), a position left of the first or at / past the last source pixel snaps
  to it with weights (2048, 0); along y only the indices are clipped, the weights stay.
  """
  in_size = _cast(in_size, xp.int32, xp)
  src = (_cast(dst, xp.float64, xp) + 0.5) * _inverse_scale(in_size, out_size, xp) - 0.5
  src = _cast(src, xp.float32, xp)
  base = xp.floor(src)
  frac = src - base
  base = _cast(base, xp.int32, xp)
  if horizontal:
    frac = xp.where((base < 0) | (base >= in_size - 1), xp.zeros_like(frac), frac)
  w_lo = _cast(xp.round((1.0 - frac) * float(_COEF_SCALE)), xp.int32, xp)
  w_hi = _cast(xp.round(frac * float(_COEF_SCALE)), xp.int32, xp)
  lo = xp.minimum(xp.maximum(base, 0), in_size - 1)
  hi = xp.minimum(xp.maximum(base + 1, 0), in_size - 1)
  return lo, hi, w_lo, w_hi


def linear_columns(left, right, w_left, w_right, xp=np):
  """OpenCV's horizontal pass as its vertical pass reads it: (left * w_left + right * w_right) >> 4.

  `left` / `right`: int32 source pixels at the (lo, hi) column taps; int32 weights broadcast to
  them. OpenCV keeps the sum (in 1/2048 units) and shifts it right by 4 in the vertical pass;
  shifting here, before the rows are gathered, is the same and cheaper.
  """
  return _shift_right(left * w_left + right * w_right, 4, xp)


def linear_rows(top, bottom, w_top, w_bottom, xp=np):
  """OpenCV's vertical pass of uint8 INTER_LINEAR: int32 pixel values in [0, 255].

  top / bottom: `linear_columns` of the (lo, hi) row taps. OpenCV (VResizeLinear for uchar, SIMD
  and scalar alike) multiplies each by its 11-bit weight, keeps the high 16 bits and rounds the
  total by 2 bits: ((w0 * t) >> 16 + (w1 * b) >> 16 + 2) >> 2, not the exactly rounded value.
  No clipping is needed: with pixels <= 255 and weight pairs summing to at most 2049 (each
  weight is rounded on its own), the total is at most 1020.
  """
  total = _shift_right(w_top * top, 16, xp) + _shift_right(w_bottom * bottom, 16, xp)
  return _shift_right(total + 2, 2, xp)


def resize_linear_window(image: np.ndarray, size: Tuple[int, int], rows: np.ndarray,
                         cols: np.ndarray) -> np.ndarray:
  """Pixels (rows x cols) of `cv2.resize(image, (w, h), interpolation=INTER_LINEAR)`, bit for bit.

  Args:
    image: (H, W[, C]) uint8.
    size: the resized (h, w).
    rows, cols: int vectors of output positions in the resized image, in any order (a reversed
      `cols` gives the horizontally flipped window).
  Returns:
    (len(rows), len(cols)[, C]) int32 holding OpenCV's uint8 values. Only the source rows the
    window needs are interpolated along x.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'resize_linear: expected uint8, got {image.dtype}.')
  rows, cols = np.asarray(rows), np.asarray(cols)
  r_lo, r_hi, r_wlo, r_whi = linear_taps(rows, image.shape[0], int(size[0]), horizontal=False)
  c_lo, c_hi, c_wlo, c_whi = linear_taps(cols, image.shape[1], int(size[1]), horizontal=True)
  n = len(rows)
  source_rows, where = np.unique(np.concatenate([r_lo, r_hi]), return_inverse=True)
  src = image[source_rows].astype(np.int32)
  extra = (slice(None),) + (None,) * (image.ndim - 2)
  sums = linear_columns(src[:, c_lo], src[:, c_hi], c_wlo[extra], c_whi[extra])
  top, bottom = sums[where[:n]], sums[where[n:]]
  return linear_rows(top, bottom, r_wlo[(slice(None), None) + extra[1:]],
                     r_whi[(slice(None), None) + extra[1:]])


def resize_linear(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """(h, w[, C]) uint8 `cv2.resize(image, (w, h), interpolation=INTER_LINEAR)` of (H, W[, C]) uint8.

  Only the source rows the output needs are interpolated along x.
  """
  out_h, out_w = int(size[0]), int(size[1])
  return resize_linear_window(image, (out_h, out_w), np.arange(out_h),
                              np.arange(out_w)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Normalisation.


def normalize(image, mean: Sequence[float], std: Sequence[float], xp=np):
  """mmcv `imnormalize` of float32 RGB (..., 3): float32 (x - mean) * (1 / std), bit for bit.

  mmcv calls `cv2.subtract` with the mean as float32 (a float32 difference), then
  `cv2.multiply` with 1 / std in float64, rounding the product to float32 once: so the
  product is taken in float64 here too. `image`: float32 numpy array (xp=np) or tf.Tensor (xp=tf).
  """
  mean32 = np.asarray(mean, np.float32)
  inv_std = 1.0 / np.asarray(std, np.float64)
  if np.all(mean32 == mean32[0]) and np.all(inv_std == inv_std[0]):
    # Scalars: much cheaper than a (3,) broadcast in TF; the same values.
    mean32, inv_std = float(mean32[0]), float(inv_std[0])
  return _cast(_cast(image - mean32, xp.float64, xp) * inv_std, xp.float32, xp)


# ---------------------------------------------------------------------------------------------
# The train transform's random draws (mmseg Resize(ratio_range), RandomCrop, RandomFlip and
# PhotoMetricDistortion in mmseg/datasets/pipelines/transforms.py): every random number of one
# example sits in one float64 vector of NUM_UNIFORMS uniforms in [0, 1), read by the rules below
# in `augment` (tf.data, xp=tf) and `numpy_pipeline` (xp=np) alike.

# mmseg PhotoMetricDistortion defaults (every released SegViT config uses them).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV 8-bit hue units (180 = a full turn); randint(-18, 18) is in [-18, 17]

# mmseg RandomCrop: 10 checked candidates; after 10 rejections an 11th one is used unchecked.
CROP_TRIES = 10

# Slots of the per-example uniform vector.
SLOT_RATIO, SLOT_FLIP = 0, 1
SLOT_BRIGHT_ON, SLOT_BRIGHT, SLOT_MODE, SLOT_CONTRAST_ON, SLOT_CONTRAST = 2, 3, 4, 5, 6
SLOT_SAT_ON, SLOT_SAT, SLOT_HUE_ON, SLOT_HUE = 7, 8, 9, 10
SLOT_CROP = 11  # 2 * (CROP_TRIES + 1) slots: (y, x) per candidate
NUM_UNIFORMS = SLOT_CROP + 2 * (CROP_TRIES + 1)


def _reduce(xp, name: str):
  # numpy's sum / max are tensorflow's reduce_sum / reduce_max.
  return getattr(xp, f'reduce_{name}', None) or getattr(xp, name)


def random_scale(u, img_scale: Sequence[Any], ratio_range: Sequence[float],
                 xp=np) -> Tuple[Any, Any]:
  """mmseg Resize `random_sample_ratio`: `ratio_scale(img_scale, r)`, r = u * (max - min) + min.

  `u`: the uniform of slot SLOT_RATIO. Returns float64 bounds, as `ratio_scale`.
  """
  lo, hi = float(ratio_range[0]), float(ratio_range[1])
  return ratio_scale(img_scale, _cast(u, xp.float64, xp) * (hi - lo) + lo, xp)


def crop_offsets(u, new_hw: Sequence[Any], crop_hw: Sequence[int], xp=np):
  """mmseg RandomCrop `get_crop_bbox` of each candidate: (n, 2) int32 (y0, x0) offsets.

  randint(0, max(size - crop, 0) + 1) on each axis, as floor(u * (margin + 1)) of the (n, 2)
  uniforms `u` (slots SLOT_CROP on), kept <= margin against float rounding.
  """
  margin = xp.maximum(_cast(new_hw, xp.int32, xp) - _cast(crop_hw, xp.int32, xp), 0)
  off = xp.floor(_cast(u, xp.float64, xp) * _cast(margin + 1, xp.float64, xp)[None])
  return xp.minimum(_cast(off, xp.int32, xp), margin[None])


def crop_accepted(class_counts, cat_max_ratio: float, xp=np):
  """mmseg RandomCrop's check of a candidate crop: > 1 class present and max count / total < ratio.

  `class_counts`: int64 pixel counts of the crop's label values with the ignore label's count
  zeroed (mmseg drops `ignore_index` before counting). Returns a bool (scalar).
  """
  present = _reduce(xp, 'sum')(_cast(class_counts > 0, xp.int64, xp))
  total = _reduce(xp, 'sum')(class_counts)
  largest = _reduce(xp, 'max')(class_counts)
  ratio = _cast(largest, xp.float64, xp) / _cast(xp.maximum(total, 1), xp.float64, xp)
  return xp.logical_and(present > 1, ratio < cat_max_ratio)


def photometric_params(u, xp=np) -> dict:
  """mmseg PhotoMetricDistortion's draws from the example's uniforms (each step with p = 0.5).

  `u`: (NUM_UNIFORMS, ...) uniforms. Flags are bools, amounts float32 (as the pixels).
  """
  u = _cast(u, xp.float64, xp)

  def between(x, lo, hi):
    return _cast(x * (hi - lo) + lo, xp.float32, xp)

  return {
      'brightness_on': u[SLOT_BRIGHT_ON] < 0.5,
      'brightness': between(u[SLOT_BRIGHT], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
      'contrast_first': u[SLOT_MODE] < 0.5,  # mmseg mode == 1
      'contrast_on': u[SLOT_CONTRAST_ON] < 0.5,
      'contrast': between(u[SLOT_CONTRAST], *CONTRAST_RANGE),
      'saturation_on': u[SLOT_SAT_ON] < 0.5,
      'saturation': between(u[SLOT_SAT], *SATURATION_RANGE),
      'hue_on': u[SLOT_HUE_ON] < 0.5,
      # randint(-18, 18): integers in [-18, 17].
      'hue': _cast(xp.floor(u[SLOT_HUE] * (2 * HUE_DELTA)) - HUE_DELTA, xp.float32, xp),
  }


def convert_pixels(x, alpha=1.0, beta=0.0, xp=np):
  """mmseg PhotoMetricDistortion `convert` on float32 pixels holding integers: x * alpha + beta,
  clipped to [0, 255] and truncated as its astype(np.uint8) does; stays float32."""
  return xp.floor(xp.minimum(xp.maximum(x * alpha + beta, 0.0), 255.0))


def round_pixels(x, xp=np):
  """Round half up and clip to [0, 255], as OpenCV's saturate_cast to uint8; stays float32."""
  return xp.minimum(xp.maximum(xp.floor(x + 0.5), 0.0), 255.0)
