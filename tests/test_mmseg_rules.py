"""segvit_jax.data.mmseg_rules against OpenCV itself and mmcv's formulas, bit for bit (no TensorFlow)."""

import numpy as np
import pytest

import mmcv_reference as ref
from segvit_jax.data import mmseg_rules


@pytest.fixture(scope='session')
def photo():
  return ref.photo()


# ---------------------------------------------------------------------------------------------
# Decoding.


def test_decode_image_equals_opencv_on_every_variant(photo):
  variants = ref.image_variants(photo)
  for name, data in variants.items():
    want = ref.imdecode(data)
    got = mmseg_rules.decode_image(data)
    assert got.dtype == np.uint8 and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  # The variants really differ from one another where they should.
  assert ref.imdecode(variants['jpeg exif orientation 6']).shape == (512, 600, 3)
  assert not np.array_equal(ref.imdecode(variants['jpeg progressive']),
                            ref.imdecode(variants['jpeg 4:2:2']))


def test_decode_image_of_the_shipped_photograph(photo):
  np.testing.assert_array_equal(mmseg_rules.decode_image(ref.photo_bytes()), photo)


def test_16_bit_png_is_its_high_byte_like_opencv(photo):
  rgb16 = ref.to_16bit(photo)
  got = mmseg_rules.decode_image(ref.encode_png16(rgb16[..., 0].copy()))
  np.testing.assert_array_equal(got, np.repeat((rgb16[..., :1] >> 8).astype(np.uint8), 3, -1))
  # OpenCV truncates (x >> 8), it does not round (x * 255 / 65535): 0x80FF -> 128, not 129.
  row = np.array([[0x0000, 0x00FF, 0x7FFF, 0x8000, 0x80FF, 0xFF7F, 0xFFFF]], np.uint16)
  data = ref.encode_png16(row)
  assert ref.imdecode(data)[0, :, 0].tolist() == [0, 0, 127, 128, 128, 255, 255]
  assert mmseg_rules.decode_image(data)[0, :, 0].tolist() == [0, 0, 127, 128, 128, 255, 255]


def test_decode_image_rejects_what_is_not_an_image():
  with pytest.raises(Exception, match='cannot identify'):
    mmseg_rules.decode_image(b'not an image')
  truncated = ref.photo_bytes()[:5000]
  with pytest.raises(OSError):
    mmseg_rules.decode_image(truncated)


def test_decode_label_keeps_indices():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 151, (20, 30)).astype(np.uint8)
  label[0, 0] = 255
  np.testing.assert_array_equal(mmseg_rules.decode_label(ref.encode(label, 'PNG')), label)
  # A palette PNG gives its indices, as mmseg's Pillow 'unchanged' read does, not colours.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  palette = Image.fromarray(label, 'P')
  palette.putpalette(list(rng.integers(0, 256, 768)))
  np.testing.assert_array_equal(mmseg_rules.decode_label(ref.encode(palette, 'PNG')), label)
  with pytest.raises(ValueError, match='one channel'):
    mmseg_rules.decode_label(ref.encode(np.zeros((4, 4, 3), np.uint8), 'PNG'))
  with pytest.raises(ValueError, match='0..255'):
    mmseg_rules.decode_label(ref.encode_png16(np.full((4, 4), 300, np.uint16)))


# ---------------------------------------------------------------------------------------------
# Sizes.


def test_rescale_size_known_values():
  # ADE 683x512 landscape (h=512, w=683) under the test scale (2048, 640): factor 1.25.
  assert mmseg_rules.rescale_size((512, 683), (2048, 640)) == (640, 854)
  # A 3.5:1 panorama is bounded by the long side: 2048 / 700.
  assert mmseg_rules.rescale_size((200, 700), (2048, 640)) == (585, 2048)
  # PASCAL-Context 500x375, scale (520, 520), min_size 480: the short side is 520.
  assert mmseg_rules.rescale_size((375, 500), (520, 520), 480) == (520, 693)
  # COCO with min_size 512 at a small ratio: the short side is clamped up to 512.
  assert mmseg_rules.rescale_size((480, 640), (1024, 256), 512) == (512, 683)
  # mmcv's float64 lands below an exact .5 tie: 1247 x 172 with short side 910 -> 6597.5 * (1 -
  # 2**-53) -> 6597, where exact rounding would give 6598.
  assert mmseg_rules.rescale_size((1247, 172), (10_000, 910)) == ref.rescale_size(
      1247, 172, (10_000, 910)) == (6597, 910)


@pytest.mark.parametrize('img_scale,min_size', [((2048, 640), 0), ((2048, 512), 512),
                                                ((520, 520), 480), ((2048, 512), 0)])
def test_rescale_size_equals_mmcv_at_every_ratio(img_scale, min_size):
  rng = np.random.default_rng(1)
  for h, w in rng.integers(20, 2500, (300, 2)):
    for ratio in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, float(rng.uniform(0.5, 2.0))):
      scale = mmseg_rules.ratio_scale(img_scale, ratio)
      assert tuple(int(s) for s in scale) == ref.ratio_scale(img_scale, ratio)
      got = mmseg_rules.rescale_size((int(h), int(w)), scale, min_size)
      assert got == ref.rescale_size(int(h), int(w), ref.ratio_scale(img_scale, ratio), min_size)


# ---------------------------------------------------------------------------------------------
# Resize.


def _resize_cases(rng, n):
  for i in range(n):
    h, w = (int(v) for v in rng.integers(1, 130, 2))
    out_h, out_w = (int(v) for v in rng.integers(1, 260, 2))
    channels = [(), (1,), (3,), (4,)][i % 4]
    yield rng.integers(0, 256, (h, w) + channels).astype(np.uint8), out_h, out_w


def test_resize_linear_equals_opencv_on_random_images():
  rng = np.random.default_rng(2)
  for image, out_h, out_w in _resize_cases(rng, 300):
    np.testing.assert_array_equal(mmseg_rules.resize_linear(image, (out_h, out_w)),
                                  ref.imresize_linear(image, out_h, out_w),
                                  err_msg=f'{image.shape} -> {(out_h, out_w)}')


@pytest.mark.parametrize('out_hw', [(640, 546), (2048, 1748), (300, 256), (1200, 1024),
                                    (599, 512), (123, 77), (600, 512), (201, 1000)])
def test_resize_linear_equals_opencv_on_a_photograph(photo, out_hw):
  got = mmseg_rules.resize_linear(photo, out_hw)
  np.testing.assert_array_equal(got, ref.imresize_linear(photo, *out_hw))


def test_resize_linear_is_not_the_exactly_rounded_bilinear(photo):
  # OpenCV's integer vertical pass truncates: a float bilinear rounded to nearest differs on
  # about a tenth of the values, so this rule is not one of the usual ones.
  out_h, out_w = 640, 546
  lo, hi, wlo, whi = mmseg_rules.linear_taps(np.arange(out_h), 600, out_h, horizontal=False)
  clo, chi, cwlo, cwhi = mmseg_rules.linear_taps(np.arange(out_w), 512, out_w, horizontal=True)
  x = photo.astype(np.float64)
  x = x[:, clo] * (cwlo / 2048)[:, None] + x[:, chi] * (cwhi / 2048)[:, None]
  x = x[lo] * (wlo / 2048)[:, None, None] + x[hi] * (whi / 2048)[:, None, None]
  exact = np.floor(x + 0.5)
  cv = ref.imresize_linear(photo, out_h, out_w)
  assert 0.05 < np.mean(exact != cv) < 0.3 and np.abs(exact - cv).max() == 1


def test_nearest_source_index_equals_opencv():
  # in 3 -> out 2: OpenCV floor(d * 1.5) = [0, 1]; half-pixel centres would give [0, 2].
  assert mmseg_rules.nearest_source_index(np.arange(2), 3, 2).tolist() == [0, 1]
  rng = np.random.default_rng(3)
  for image, out_h, out_w in _resize_cases(rng, 200):
    label = image if image.ndim == 2 else image[..., 0]
    rows = mmseg_rules.nearest_source_index(np.arange(out_h), label.shape[0], out_h)
    cols = mmseg_rules.nearest_source_index(np.arange(out_w), label.shape[1], out_w)
    np.testing.assert_array_equal(label[rows][:, cols],
                                  ref.imresize_nearest(label, out_h, out_w))


# ---------------------------------------------------------------------------------------------
# Normalisation.


@pytest.mark.parametrize('mean,std', [((127.5,) * 3, (127.5,) * 3),
                                      ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))])
def test_normalize_equals_mmcv_imnormalize(photo, mean, std):
  got = mmseg_rules.normalize(photo.astype(np.float32), mean, std)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, ref.imnormalize(photo, mean, std))
