"""augment.py against mmseg 0.24 / mmcv 1.4 / OpenCV behaviour.

Resizes are compared with OpenCV itself (`cv2.resize`, bit for bit), sizes and normalisation with
mmcv's formulas (`mmcv_reference`); RandomCrop and PhotoMetricDistortion with plain per-example
numpy code written from mmseg's transforms (OpenCV's 8-bit HSV formulas), independent of the
fused TensorFlow implementation.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest
import tensorflow as tf

import mmcv_reference
from segvit_jax.data import augment
from segvit_jax.data import mmseg_rules

_U8_IMAGE = tf.TensorSpec([None, None, 3], tf.uint8)
_U8_LABEL = tf.TensorSpec([None, None], tf.uint8)
_SEED = tf.TensorSpec([2], tf.int64)


def _graph(fn, *specs):
  """fn traced once for `specs` (dynamic shapes): loops over many cases stay fast."""
  return tf.function(fn, input_signature=list(specs))

# ---------------------------------------------------------------------------------------------
# References.


ref_rescale_size = mmcv_reference.rescale_size


def ref_random_scale(u, img_scale, ratio_range):
  ratio = u * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  return mmcv_reference.ratio_scale(img_scale, ratio)


def ref_nearest(x, out_h, out_w):
  return mmcv_reference.imresize_nearest(x, out_h, out_w)


def ref_linear(x, out_h, out_w):
  return mmcv_reference.imresize_linear(x, out_h, out_w)


def ref_crop_ok(seg, cat_max_ratio, ignore=255):
  labels, cnt = np.unique(seg, return_counts=True)
  cnt = cnt[labels != ignore]
  return len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio


def ref_random_crop(seg, crop, candidates, cat_max_ratio):
  """mmseg RandomCrop.__call__ with the random boxes replaced by `candidates` (y, x) in order."""
  it = iter(candidates)
  y, x = next(it)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      if ref_crop_ok(seg[y:y + crop[0], x:x + crop[1]], cat_max_ratio):
        return y, x
      y, x = next(it)
  return y, x  # after 10 rejections: the 11th box, unchecked


def ref_rgb2hsv_u8(img):
  """OpenCV COLOR_RGB2HSV for uint8: H in [0, 180) (degrees / 2), S and V in [0, 255]."""
  x = img.astype(np.float64) / 255.0
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(-1)
  d = v - x.min(-1)
  s = np.where(v > 0, d / np.maximum(v, 1e-12), 0.0)
  safe = np.maximum(d, 1e-12)
  h = np.where(v == r, 60 * (g - b) / safe,
               np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
  h = np.where(d == 0, 0.0, h)
  h = np.where(h < 0, h + 360, h)
  out = np.stack([np.round(h / 2) % 180, np.round(s * 255), np.round(v * 255)], -1)
  return out.astype(np.int64)


def ref_hsv2rgb_u8(hsv):
  h = hsv[..., 0].astype(np.float64) * 2
  s = hsv[..., 1] / 255.0
  v = hsv[..., 2] / 255.0
  c = v * s
  hp = h / 60.0
  x = c * (1 - np.abs(hp % 2 - 1))
  z = np.zeros_like(c)
  sector = np.floor(hp).astype(int) % 6
  rgb = np.select([sector[..., None] == k for k in range(6)],
                  [np.stack(t, -1) for t in ((c, x, z), (x, c, z), (z, c, x), (z, x, c),
                                             (x, z, c), (c, z, x))])
  return np.clip(np.round((rgb + (v - c)[..., None]) * 255), 0, 255).astype(np.uint8)


def ref_photometric(img, p):
  """mmseg 0.24 PhotoMetricDistortion on uint8 with fixed draws `p` (same keys as ours)."""

  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  def contrast(x):
    return convert(x, alpha=p['contrast']) if p['contrast_on'] else x

  img = img.copy()
  if p['brightness_on']:
    img = convert(img, beta=p['brightness'])
  if p['contrast_first']:
    img = contrast(img)
  if p['saturation_on']:
    hsv = ref_rgb2hsv_u8(img)
    hsv[..., 1] = convert(hsv[..., 1], alpha=p['saturation'])
    img = ref_hsv2rgb_u8(hsv)
  if p['hue_on']:
    hsv = ref_rgb2hsv_u8(img)
    hsv[..., 0] = (hsv[..., 0] + int(p['hue'])) % 180
    img = ref_hsv2rgb_u8(hsv)
  if not p['contrast_first']:
    img = contrast(img)
  return img


def ref_train_transform(image, label, u, crop, img_scale, ratio_range, cat_max_ratio, flip_prob,
                        mean, std):
  """Whole official train pipeline (no photometric) from the example's uniforms `u`."""
  h, w = label.shape
  new_h, new_w = ref_rescale_size(h, w, ref_random_scale(u[0], img_scale, ratio_range))
  img = ref_linear(image, new_h, new_w)
  seg = ref_nearest(label, new_h, new_w)
  margins = (max(new_h - crop[0], 0), max(new_w - crop[1], 0))
  cu = u[augment._CROP:].reshape(-1, 2)
  candidates = [(int(a * (margins[0] + 1)), int(b * (margins[1] + 1))) for a, b in cu]
  y, x = ref_random_crop(seg, crop, candidates, cat_max_ratio)
  img = img[y:y + crop[0], x:x + crop[1]]
  seg = seg[y:y + crop[0], x:x + crop[1]]
  if u[augment._FLIP] < flip_prob:
    img, seg = img[:, ::-1], seg[:, ::-1]
  img = mmcv_reference.imnormalize(img, mean, std)
  out_img = np.zeros(tuple(crop) + (3,), np.float32)
  out_seg = np.full(tuple(crop), 255)
  out_img[:img.shape[0], :img.shape[1]] = img
  out_seg[:seg.shape[0], :seg.shape[1]] = seg
  return out_img, out_seg, (new_h, new_w), (y, x)


def _blocky_label(rng, h, w, num_classes=6, block=8, ignore_frac=0.1):
  """Piecewise-constant labels (blocks), some 255, so crops pass and fail the ratio check."""
  small = rng.integers(0, num_classes, (-(-h // block), -(-w // block)))
  small[rng.random(small.shape) < ignore_frac] = 255
  return np.kron(small, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Decoding.


def test_decode_image_in_the_graph_equals_opencv():
  decode = _graph(lambda d: (augment.decode_image(d), augment.tf_decodes_as_opencv(d)),
                  tf.TensorSpec([], tf.string))
  rng = np.random.default_rng(0)
  for source in (mmcv_reference.photo()[100:160, 50:130], rng.integers(0, 256, (23, 31, 3))):
    for name, data in mmcv_reference.image_variants(source.astype(np.uint8)).items():
      image, native = decode(tf.constant(data))
      np.testing.assert_array_equal(image, mmcv_reference.imdecode(data), err_msg=name)
      # TensorFlow's own decoders serve every file but those they would get wrong.
      assert bool(native) == ('exif' not in name and 'cmyk' not in name), name
  with pytest.raises(tf.errors.OpError, match='cannot identify image'):
    decode(tf.constant(b'not an image'))


def test_decode_label_in_the_graph_keeps_indices():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  label = rng.integers(0, 256, (9, 14)).astype(np.uint8)
  palette = Image.fromarray(label, 'P')
  palette.putpalette([int(v) for v in rng.integers(0, 256, 768)])
  for data in (mmcv_reference.encode(label, 'PNG'), mmcv_reference.encode(palette, 'PNG')):
    np.testing.assert_array_equal(augment.decode_label(tf.constant(data)), label)


# ---------------------------------------------------------------------------------------------
# Resize target size.


def test_resized_size_known_values():
  # ADE 683x512 landscape (h=512, w=683): train scale (2048, 512) at r=1 keeps it.
  assert tuple(augment.resized_size([512, 683], [2048.0, 512.0]).numpy()) == (512, 683)
  assert tuple(augment.resized_size([512, 683], [2048.0, 640.0]).numpy()) == (640, 854)
  assert tuple(augment.resized_size([375, 500], [520.0, 520.0], 480).numpy()) == (520, 693)


def test_rescale_size_matches_reference():
  rng = np.random.default_rng(0)
  img_scales = [(2048, 512), (2048, 640), (520, 520)]
  sample = {s: _graph(lambda u, s=s: augment.sample_scale(u, s, (0.5, 2.0)),
                      tf.TensorSpec([], tf.float64)) for s in img_scales}
  sizes = {m: _graph(lambda hw, scale, m=m: augment.resized_size(hw, scale, m),
                     tf.TensorSpec([2], tf.int32), tf.TensorSpec([2], tf.float64))
           for m in (0, 480, 512)}
  for _ in range(300):
    h, w = (int(v) for v in rng.integers(20, 2500, 2))
    u = float(rng.random())
    img_scale = img_scales[int(rng.integers(3))]
    min_size = [0, 0, 480, 512][int(rng.integers(4))]
    scale = ref_random_scale(u, img_scale, (0.5, 2.0))
    ours_scale = sample[img_scale](u).numpy()
    assert tuple(ours_scale) == scale
    ours = tuple(sizes[min_size]([h, w], ours_scale).numpy())
    assert ours == ref_rescale_size(h, w, scale, min_size), (h, w, scale, min_size)
    # The host (numpy) form of the same rule agrees.
    assert mmseg_rules.rescale_size((h, w), scale, min_size) == ours


def test_sample_scale_bounds():
  u = tf.constant([0.0, 0.999999999], tf.float64)
  lo = augment.sample_scale(u[0], (2048, 512), (0.5, 2.0)).numpy()
  hi = augment.sample_scale(u[1], (2048, 512), (0.5, 2.0)).numpy()
  assert tuple(lo) == (1024, 256) and tuple(hi) == (4095, 1023)  # int() truncates


# ---------------------------------------------------------------------------------------------
# Interpolation rules.


@pytest.mark.parametrize('in_hw,out_hw', [((7, 9), (7, 9)), ((10, 13), (23, 31)),
                                          ((37, 29), (11, 8)), ((20, 16), (10, 8)),
                                          ((683, 512), (1024, 768))])
def test_nearest_window_matches_reference(in_hw, out_hw):
  rng = np.random.default_rng(1)
  label = rng.integers(0, 256, in_hw).astype(np.uint8)
  full = ref_nearest(label, *out_hw)
  np.testing.assert_array_equal(
      augment.resize_window_nearest(label, out_hw, tf.range(out_hw[0]), tf.range(out_hw[1])), full)
  # A flipped window inside the resized map.
  y0, x0, ch, cw = out_hw[0] // 3, out_hw[1] // 4, out_hw[0] // 2 + 1, out_hw[1] // 2 + 1
  window = augment.resize_window_nearest(label, out_hw, y0 + tf.range(ch),
                                         tf.reverse(x0 + tf.range(cw), [0]))
  np.testing.assert_array_equal(window, full[y0:y0 + ch, x0:x0 + cw][:, ::-1])


@pytest.mark.parametrize('in_hw,out_hw', [((7, 9), (7, 9)), ((10, 13), (23, 31)),
                                          ((37, 29), (11, 8)), ((20, 16), (10, 8)),
                                          ((5, 40), (12, 17)), ((1, 6), (4, 3)),
                                          ((600, 512), (640, 546)), ((600, 512), (1101, 943))])
def test_linear_window_equals_opencv(in_hw, out_hw):
  rng = np.random.default_rng(2)
  if in_hw == (600, 512):
    image = mmcv_reference.photo()
  else:
    image = rng.integers(0, 256, in_hw + (3,)).astype(np.uint8)
  full = ref_linear(image, *out_hw)
  ours = augment.resize_window_linear(image, out_hw, tf.range(out_hw[0]), tf.range(out_hw[1]))
  np.testing.assert_array_equal(ours, full)
  y0, x0, ch, cw = out_hw[0] // 3, out_hw[1] // 4, out_hw[0] // 2 + 1, out_hw[1] // 2 + 1
  window = augment.resize_window_linear(image, out_hw, y0 + tf.range(ch),
                                        tf.reverse(x0 + tf.range(cw), [0]))
  np.testing.assert_array_equal(window, full[y0:y0 + ch, x0:x0 + cw][:, ::-1])


def test_round_pixels_half_up_and_clip():
  x = tf.constant([-3.0, 0.49, 0.5, 1.5, 2.5, 254.6, 300.0])
  assert augment.round_pixels(x).numpy().tolist() == [0, 0, 1, 2, 3, 255, 255]


# ---------------------------------------------------------------------------------------------
# RandomCrop.


@pytest.mark.parametrize('counts,expected', [
    ({3: 100}, False),  # one class
    ({255: 100}, False),  # nothing but ignore
    ({0: 75, 1: 25}, False),  # max / total = 0.75 is not < 0.75
    ({0: 74, 1: 26}, True),
    ({0: 70, 1: 30, 255: 900}, True),  # ignore pixels do not count
    ({0: 80, 1: 10, 2: 10}, False),
    ({4: 1, 7: 1}, True),
])
def test_crop_accepted_rule(counts, expected):
  seg = np.concatenate([np.full(n, c, np.uint8) for c, n in counts.items()])
  np.random.default_rng(0).shuffle(seg)
  seg = seg.reshape(1, -1)
  assert ref_crop_ok(seg, 0.75) == expected  # the reference agrees with the table
  assert bool(augment.crop_accepted(seg, 0.75)) == expected


def test_choose_crop_matches_reference():
  rng = np.random.default_rng(3)
  crop = (24, 32)
  choose = _graph(lambda label, hw, off: augment.choose_crop(label, hw, crop, off, 0.75),
                  _U8_LABEL, tf.TensorSpec([2], tf.int32), tf.TensorSpec([None, 2], tf.int32))
  fell_through = accepted_first = 0
  for trial in range(40):
    h, w = (int(v) for v in rng.integers(16, 80, 2))
    label = _blocky_label(rng, h, w, num_classes=int(rng.integers(1, 4)), block=12)
    new_hw = tuple(int(v) for v in rng.integers(16, 90, 2))
    u = rng.random((augment.CROP_TRIES + 1, 2))
    offsets = augment.crop_offsets(u, new_hw, crop).numpy()
    margins = (max(new_hw[0] - crop[0], 0), max(new_hw[1] - crop[1], 0))
    expected_offsets = [(int(a * (margins[0] + 1)), int(b * (margins[1] + 1))) for a, b in u]
    assert [tuple(o) for o in offsets] == expected_offsets
    seg = ref_nearest(label, *new_hw)
    expected = ref_random_crop(seg, crop, expected_offsets, 0.75)
    ours, window = choose(label, new_hw, offsets)
    ours = tuple(ours.numpy())
    assert ours == expected, trial
    np.testing.assert_array_equal(window, seg[ours[0]:ours[0] + crop[0], ours[1]:ours[1] + crop[1]])
    checked = [ref_crop_ok(seg[y:y + crop[0], x:x + crop[1]], 0.75) for y, x in expected_offsets]
    fell_through += not any(checked[:10])
    accepted_first += checked[0]
  assert fell_through > 0 and accepted_first > 0  # both branches of the rule were exercised
  # cat_max_ratio >= 1: the first candidate, unchecked.
  label = np.zeros((40, 40), np.uint8)
  offsets = augment.crop_offsets(rng.random((augment.CROP_TRIES + 1, 2)), (40, 40), (8, 8))
  assert tuple(augment.choose_crop(label, (40, 40), (8, 8), offsets, 1.0)[0].numpy()) == tuple(
      offsets[0].numpy())


# ---------------------------------------------------------------------------------------------
# Whole train transform (resize + crop + flip + normalise + pad) against the reference pipeline.

TRAIN_KW = dict(crop_size=(32, 40), img_scale=(96, 48), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                flip_prob=0.5, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def test_train_transform_matches_reference():
  rng = np.random.default_rng(4)
  flips = pads = 0
  transform = _graph(
      lambda i, lbl, s: augment.train_transform(i, lbl, s, photometric=False, **TRAIN_KW),
      _U8_IMAGE, _U8_LABEL, _SEED)
  for i in range(24):
    h, w = (int(v) for v in rng.integers(20, 90, 2))
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    label = _blocky_label(rng, h, w, block=6)
    seed = np.array([7, i], np.int64)
    out = transform(image, label, seed)
    u = augment.example_uniforms(seed).numpy()
    ref_img, ref_seg, new_hw, _ = ref_train_transform(
        image, label, u, TRAIN_KW['crop_size'], TRAIN_KW['img_scale'], TRAIN_KW['ratio_range'],
        0.75, 0.5, TRAIN_KW['mean'], TRAIN_KW['std'])
    assert out['image'].shape == (32, 40, 3) and out['image'].dtype == tf.float32
    assert out['label'].shape == (32, 40) and out['label'].dtype == tf.int32
    np.testing.assert_array_equal(out['label'], ref_seg)
    np.testing.assert_array_equal(out['image'], ref_img)  # OpenCV + mmcv, bit for bit
    flips += u[augment._FLIP] < 0.5
    if new_hw[0] < 32 or new_hw[1] < 40:
      pads += 1
      valid = np.zeros((32, 40), bool)
      valid[:min(new_hw[0], 32), :min(new_hw[1], 40)] = True
      assert np.all(out['image'].numpy()[~valid] == 0.0)  # image padded with 0 after Normalize
      assert np.all(out['label'].numpy()[~valid] == 255)
  assert 0 < flips < 24 and pads > 0


def test_image_and_label_crops_coincide():
  """Identity resize; the image carries (label, row, column): any offset or flip mismatch shows."""
  rng = np.random.default_rng(5)
  kw = dict(TRAIN_KW, img_scale=(10_000, 40), ratio_range=(1.0, 1.0), mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0), crop_size=(24, 24))
  transform = _graph(lambda i, lbl, s: augment.train_transform(i, lbl, s, photometric=False, **kw),
                     _U8_IMAGE, _U8_LABEL, _SEED)
  flipped = 0
  for i in range(20):
    h, w = 40, int(rng.integers(40, 90))  # short side 40 = img_scale short: no resize
    label = _blocky_label(rng, h, w, num_classes=4, block=4, ignore_frac=0.0)
    rows, cols = np.mgrid[:h, :w]
    image = np.stack([label * 40, rows, cols], -1).astype(np.uint8)
    out = transform(image, label, np.array([1, i], np.int64))
    img, lab = out['image'].numpy(), out['label'].numpy()
    np.testing.assert_array_equal(img[..., 0], lab * 40)
    y0 = int(img[0, 0, 1])
    np.testing.assert_array_equal(img[..., 1], np.repeat(y0 + np.arange(24)[:, None], 24, 1))
    x = img[0, :, 2].astype(int)
    flip = x[0] > x[-1]
    flipped += flip
    x0 = int(x.min())
    expected_cols = x0 + np.arange(24)
    np.testing.assert_array_equal(x, expected_cols[::-1] if flip else expected_cols)
    crop = label[y0:y0 + 24, x0:x0 + 24]
    np.testing.assert_array_equal(lab, crop[:, ::-1] if flip else crop)
  assert 0 < flipped < 20


def test_train_transform_is_stateless():
  rng = np.random.default_rng(6)
  image = rng.integers(0, 256, (50, 70, 3)).astype(np.uint8)
  label = _blocky_label(rng, 50, 70)
  a = augment.train_transform(image, label, [3, 11], photometric=True, **TRAIN_KW)
  b = augment.train_transform(image, label, [3, 11], photometric=True, **TRAIN_KW)
  c = augment.train_transform(image, label, [3, 12], photometric=True, **TRAIN_KW)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['image'], c['image'])


# ---------------------------------------------------------------------------------------------
# PhotoMetricDistortion.


def test_photometric_draws_ranges_and_probabilities():
  n = 1000
  seeds = tf.stack([tf.fill([n], tf.constant(5, tf.int64)), tf.range(n, dtype=tf.int64)], 1)
  draw = tf.function(
      lambda s: tf.map_fn(augment.example_uniforms, s, fn_output_signature=tf.float64))
  u = tf.transpose(draw(seeds))  # (NUM_UNIFORMS, n): photometric_params indexes the first axis
  p = {k: v.numpy() for k, v in augment.photometric_params(u).items()}
  for key in ('brightness_on', 'contrast_first', 'contrast_on', 'saturation_on', 'hue_on'):
    assert abs(p[key].mean() - 0.5) < 0.06, key  # 3.8 sigma at n = 1000
  assert p['brightness'].min() >= -32 and p['brightness'].max() < 32
  assert p['brightness'].min() < -31 and p['brightness'].max() > 31
  for key in ('contrast', 'saturation'):
    assert p[key].min() >= 0.5 and p[key].max() < 1.5 and p[key].min() < 0.51, key
  hue = p['hue']
  assert np.all(hue == np.round(hue)) and set(np.unique(hue)) == set(range(-18, 18))


@pytest.mark.parametrize('flags', [
    dict(brightness_on=True), dict(contrast_on=True, contrast_first=True),
    dict(contrast_on=True), dict(saturation_on=True), dict(hue_on=True),
    dict(brightness_on=True, contrast_on=True, saturation_on=True, hue_on=True),
    dict(brightness_on=True, contrast_on=True, contrast_first=True, saturation_on=True,
         hue_on=True),
])
def test_photometric_matches_reference(flags):
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
  for brightness, contrast, saturation, hue in ((29.7, 1.43, 1.37, 17), (-25.2, 0.61, 0.55, -18)):
    p = dict(brightness_on=False, contrast_first=False, contrast_on=False, saturation_on=False,
             hue_on=False, brightness=brightness, contrast=contrast, saturation=saturation,
             hue=hue)
    p.update(flags)
    ours = augment.photometric_distortion(
        tf.constant(image, tf.float32),
        {k: tf.constant(v, tf.bool if isinstance(v, bool) else tf.float32) for k, v in p.items()})
    ours = ours.numpy()
    ref = ref_photometric(image, p).astype(np.float32)
    assert np.all(ours == np.round(ours)) and ours.min() >= 0 and ours.max() <= 255
    diff = np.abs(ours - ref)
    if not (flags.get('saturation_on') or flags.get('hue_on')):
      np.testing.assert_array_equal(ours, ref)  # uint8 truncation semantics reproduced exactly
    else:
      # Continuous HSV vs OpenCV's 8-bit HSV (H in 2-degree steps): a few grey levels at most.
      assert diff.mean() < 1.0 and diff.max() <= 8, (flags, diff.mean(), diff.max())


def test_photometric_clips():
  white = tf.fill([4, 4, 3], 250.0)
  p = {k: tf.constant(False) for k in ('contrast_first', 'contrast_on', 'saturation_on', 'hue_on')}
  p.update(brightness_on=tf.constant(True), brightness=tf.constant(31.5), contrast=tf.constant(1.),
           saturation=tf.constant(1.), hue=tf.constant(0.))
  assert np.all(augment.photometric_distortion(white, p).numpy() == 255)
  p.update(brightness=tf.constant(-31.5))
  assert np.all(augment.photometric_distortion(white, p).numpy() == 218)  # floor(218.5)
  p.update(brightness_on=tf.constant(False), contrast_on=tf.constant(True),
           contrast=tf.constant(1.49))
  assert np.all(augment.photometric_distortion(white, p).numpy() == 255)


# ---------------------------------------------------------------------------------------------
# Normalize, Pad, eval resize.


@pytest.mark.parametrize('mean,std', [((127.5,) * 3, (127.5,) * 3),
                                      ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))])
def test_normalize_in_tf_equals_mmcv(mean, std):
  x = np.random.default_rng(8).integers(0, 256, (5, 6, 3)).astype(np.uint8)
  got = mmseg_rules.normalize(tf.constant(x, tf.float32), mean, std, xp=tf)
  assert got.dtype == tf.float32
  np.testing.assert_array_equal(got, mmcv_reference.imnormalize(x, mean, std))


def test_pad_bottom_right_values():
  img = tf.ones([3, 2, 3])
  lab = tf.fill([3, 2], 7)
  pi = augment.pad_bottom_right(img, (5, 4), 0.0).numpy()
  pl = augment.pad_bottom_right(lab, (5, 4), 255).numpy()
  assert pi.shape == (5, 4, 3) and pl.shape == (5, 4)
  assert np.all(pi[:3, :2] == 1) and np.all(pi[3:] == 0) and np.all(pi[:, 2:] == 0)
  assert np.all(pl[:3, :2] == 7) and np.all(pl[3:] == 255) and np.all(pl[:, 2:] == 255)


def test_eval_resize_matches_reference():
  rng = np.random.default_rng(9)
  for (h, w), scale, min_size in (((30, 41), (80, 20), 0), ((41, 30), (80, 20), 0),
                                  ((25, 33), (26, 26), 24), ((50, 20), (64, 16), 20)):
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    out, size = augment.eval_resize(image, scale, min_size)
    expected_hw = ref_rescale_size(h, w, scale, min_size)
    assert tuple(size.numpy()) == expected_hw
    np.testing.assert_array_equal(out, ref_linear(image, *expected_hw))


def test_train_transform_rejects_mismatched_label():
  with pytest.raises(tf.errors.InvalidArgumentError, match='image and label sizes differ'):
    augment.train_transform(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 11), np.uint8), [0, 0],
                            photometric=False, **TRAIN_KW)
