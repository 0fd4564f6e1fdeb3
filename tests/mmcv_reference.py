"""What mmseg 0.24 / mmcv 1.x do to images, as test references: OpenCV itself where mmcv calls it,
mmcv's Python arithmetic rewritten from its formulas, and real photographs to run them on.

OpenCV (opencv-python-headless) is a test dependency only: the product reproduces it.
"""

import io

import cv2
import matplotlib.cbook
import numpy as np
from PIL import Image


def rescale_size(h, w, scale, min_size=0):
  """mmseg `Resize._resize_img` (keep_ratio, SegViT's min_size) + mmcv `rescale_size`: (h, w)."""
  if min_size:
    new_short = min_size if min(scale) < min_size else min(scale)
    scale = (new_short * h / w, new_short) if h > w else (new_short, new_short * w / h)
  max_long_edge, max_short_edge = max(scale), min(scale)
  scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
  # mmcv `_scale_size`: int(w * float(scale) + 0.5), int(h * float(scale) + 0.5).
  return int(h * float(scale_factor) + 0.5), int(w * float(scale_factor) + 0.5)


def ratio_scale(img_scale, ratio):
  """mmseg `Resize.random_sample_ratio` / `MultiScaleFlipAug`: int(side * ratio)."""
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def imdecode(data: bytes) -> np.ndarray:
  """mmseg LoadImageFromFile: `cv2.imdecode(IMREAD_COLOR)`, then RGB (Normalize's to_rgb)."""
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  assert bgr is not None, 'OpenCV cannot decode these bytes'
  return np.ascontiguousarray(bgr[..., ::-1])


def imresize_linear(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """mmcv `imresize(..., interpolation='bilinear')` of uint8: cv2.resize INTER_LINEAR."""
  out = cv2.resize(image, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
  return out.reshape(int(h), int(w), *image.shape[2:])


def imresize_nearest(label: np.ndarray, h: int, w: int) -> np.ndarray:
  """mmcv `imresize(..., interpolation='nearest')`: cv2.resize INTER_NEAREST."""
  return cv2.resize(label, (int(w), int(h)), interpolation=cv2.INTER_NEAREST)


def imnormalize(rgb: np.ndarray, mean, std) -> np.ndarray:
  """mmseg Normalize(to_rgb=True) on the BGR image mmseg holds, as mmcv `imnormalize` does it."""
  img = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)  # the BGR array mmseg holds
  mean = np.float64(np.asarray(mean).reshape(1, -1))
  stdinv = 1 / np.float64(np.asarray(std).reshape(1, -1))
  cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
  cv2.subtract(img, mean, img)
  cv2.multiply(img, stdinv, img)
  return img


# ---------------------------------------------------------------------------------------------
# Photographs and their encodings.


def photo_path() -> str:
  """matplotlib's sample photograph (Grace Hopper, 600 x 512 baseline JPEG)."""
  return matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)


def photo_bytes() -> bytes:
  with open(photo_path(), 'rb') as f:
    return f.read()


def photo() -> np.ndarray:
  """(600, 512, 3) uint8 RGB: OpenCV's decoding of the sample photograph."""
  return imdecode(photo_bytes())


def encode(image, fmt: str, **params) -> bytes:
  """Pillow encoding of an array or PIL image ('JPEG' / 'PNG', Pillow save parameters)."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buf = io.BytesIO()
  image.save(buf, format=fmt, **params)
  return buf.getvalue()


def encode_png16(rgb16: np.ndarray) -> bytes:
  """A 16-bit PNG (grey (H, W), RGB or RGBA (H, W, 3|4), uint16) written by OpenCV."""
  if rgb16.ndim == 3:
    rgb16 = np.ascontiguousarray(rgb16[..., [2, 1, 0, 3][:rgb16.shape[2]]])  # OpenCV's BGR(A)
  ok, data = cv2.imencode('.png', rgb16)
  assert ok
  return data.tobytes()


def to_16bit(rgb: np.ndarray, seed: int = 0) -> np.ndarray:
  """uint16 with `rgb` as the high byte and random low bytes (what a 16-bit export looks like)."""
  low = np.random.default_rng(seed).integers(0, 256, rgb.shape, dtype=np.uint16)
  return (rgb.astype(np.uint16) << 8) | low


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return encode(image, fmt, exif=exif.tobytes(), **({'quality': 90} if fmt == 'JPEG' else {}))


def image_variants(rgb: np.ndarray) -> dict:
  """{name: encoded bytes} of `rgb` in the JPEG and PNG forms images come in."""
  im = Image.fromarray(rgb)
  alpha = (np.arange(rgb.shape[1])[None, :] * 7 % 256).astype(np.uint8).repeat(rgb.shape[0], 0)
  rgb16 = to_16bit(rgb)
  out = {
      'jpeg baseline 4:2:0': encode(im, 'JPEG', quality=90),
      'jpeg progressive': encode(im, 'JPEG', quality=90, progressive=True),
      'jpeg 4:4:4': encode(im, 'JPEG', quality=95, subsampling=0),
      'jpeg 4:2:2': encode(im, 'JPEG', quality=75, subsampling=1),
      'jpeg grey': encode(im.convert('L'), 'JPEG', quality=90),
      'jpeg cmyk': encode(im.convert('CMYK'), 'JPEG', quality=90),
      'png rgb': encode(im, 'PNG'),
      'png grey': encode(im.convert('L'), 'PNG'),
      'png palette': encode(im.convert('P'), 'PNG'),
      'png palette + tRNS': encode(im.convert('P'), 'PNG', transparency=0),
      'png 4-bit palette': encode(im.convert('P', colors=16), 'PNG', bits=4),
      'png 1-bit': encode(im.convert('1'), 'PNG'),
      'png rgba': encode(Image.fromarray(np.dstack([rgb, alpha]), 'RGBA'), 'PNG'),
      'png grey + alpha': encode(Image.fromarray(np.dstack([rgb[..., 0], alpha]), 'LA'), 'PNG'),
      'png rgb + tRNS': encode(im, 'PNG', transparency=(0, 0, 0)),
      'png 16-bit grey': encode_png16(rgb16[..., 1].copy()),
      'png 16-bit rgb': encode_png16(rgb16),
      'png 16-bit rgba': encode_png16(np.dstack([rgb16, rgb16[..., :1]])),
  }
  for orientation in range(2, 9):
    out[f'jpeg exif orientation {orientation}'] = with_orientation(im, 'JPEG', orientation)
    out[f'png exif orientation {orientation}'] = with_orientation(im, 'PNG', orientation)
  return out
