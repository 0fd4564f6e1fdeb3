"""Inference and the eval loop against numpy / PyTorch re-implementations of mmseg's test path
(`mmseg/models/segmentors/encoder_decoder.py`)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import PRODUCT_COMPILER_OPTIONS

import mmcv_reference
from segvit_jax import config as config_lib
from segvit_jax.evaluation import eval_loop
from segvit_jax.evaluation import inference
from segvit_jax.models import resize

K = 4
IGNORE = 255


# ------------------------------------------------------------------------------------------
# Fake score functions, written once for numpy and jax (xp = np or jnp).


def local_scores(xp, crops):
  """Each output pixel depends on its own input pixel and its position inside the crop."""
  _, h, w, _ = crops.shape
  y = xp.arange(h, dtype=np.float32)[None, :, None, None]
  x = xp.arange(w, dtype=np.float32)[None, None, :, None]
  k = xp.arange(K, dtype=np.float32)[None, None, None, :]
  channels = crops[..., np.array([0, 1, 2, 0])]
  return channels * (1 + 0.1 * y) + 0.05 * x * (k + 1) - 0.2 * k


def mixing_scores(xp, crops):
  """local_scores plus the crop's mean colour: sensitive to exactly which pixels a window holds."""
  mean = crops.mean(axis=(1, 2))[:, None, None, :1]
  k = xp.arange(K, dtype=np.float32)[None, None, None, :]
  return local_scores(xp, crops) + mean * (k - 1.5)


def colour_scores(xp, images):
  """Pointwise: class k scores -(distance to colour k)^2. Position independent."""
  centres = np.array([[-1, -1, -1], [1, 1, 1], [-1, 1, -1], [1, -1, 1]], np.float32)
  d = images[..., None, :] - centres
  return -(d * d).sum(-1)


class FakeModel(nn.Module):
  """A parameter-free module with the SegViT eval interface, for make_eval_step."""
  fn: str = 'local'

  @nn.compact
  def __call__(self, x, *, train):
    assert not train
    fns = {'local': local_scores, 'mixing': mixing_scores, 'colour': colour_scores}
    return fns[self.fn](jnp, x)


# ------------------------------------------------------------------------------------------
# Independent references.


def np_slide(score_np, img, crop, stride, num_classes=K):
  """mmseg 0.24 slide_inference on one unpadded image, real (possibly smaller) windows."""
  h, w = img.shape[:2]
  (ch, cw), (sh, sw) = crop, stride
  h_grids = max(h - ch + sh - 1, 0) // sh + 1
  w_grids = max(w - cw + sw - 1, 0) // sw + 1
  preds = np.zeros((h, w, num_classes))
  count = np.zeros((h, w, 1))
  for hi in range(h_grids):
    for wi in range(w_grids):
      y1, x1 = hi * sh, wi * sw
      y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      preds[y1:y2, x1:x2] += score_np(np, img[None, y1:y2, x1:x2].astype(np.float64))[0]
      count[y1:y2, x1:x2] += 1
  return preds / count


def torch_resize(x, size):
  """(h, w, C) numpy -> (size, C) with F.interpolate(bilinear, align_corners=False)."""
  t = torch.from_numpy(np.ascontiguousarray(x, np.float64)).permute(2, 0, 1)[None]
  return F.interpolate(t, size=tuple(size), mode='bilinear', align_corners=False)[0].permute(
      1, 2, 0).numpy()


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_probs(score_np, img, label_hw, crop, stride, flip=False):
  """mmseg's inference(): slide -> resize to the original size -> softmax (-> flip back)."""
  if flip:
    img = img[:, ::-1]
  probs = softmax(torch_resize(np_slide(score_np, img, crop, stride), label_hw))
  return probs[:, ::-1] if flip else probs


mmcv_rescale_size = mmcv_reference.rescale_size


def make_batch(rng, image_sizes, bucket, label_sizes=None, label_bucket=None, pad_value=None):
  """A pipeline-like eval batch; padding is random garbage unless pad_value is given."""
  b = len(image_sizes)
  label_sizes = image_sizes if label_sizes is None else label_sizes
  label_bucket = bucket if label_bucket is None else label_bucket
  if pad_value is None:
    images = rng.normal(size=(b, *bucket, 3)) * 5
  else:
    images = np.full((b, *bucket, 3), pad_value)
  labels = np.full((b, *label_bucket), IGNORE)
  for i, ((h, w), (lh, lw)) in enumerate(zip(image_sizes, label_sizes)):
    images[i, :h, :w] = rng.uniform(-1, 1, size=(h, w, 3))
    labels[i, :lh, :lw] = rng.integers(0, K, size=(lh, lw))
    labels[i, :lh, :lw][rng.random((lh, lw)) < 0.15] = IGNORE
  return {
      'image': images.astype(np.float32),
      'image_size': np.array(image_sizes, np.int32),
      'label': labels.astype(np.int32),
      'label_size': np.array(label_sizes, np.int32),
      'valid': np.ones((b,), bool),
  }


def inference_spec(**overrides):
  """config.eval's defaults with 8 x 6 windows at stride 5 x 4, K classes, no test resize rule."""
  e = config_lib.get_base_config().eval
  settings = dict(num_classes=K, mode=e.mode, crop_size=(8, 6), stride=(5, 4),
                  scales=tuple(e.scales), multi_scale=e.multi_scale, flip=e.flip)
  settings.update(overrides)
  return inference.InferenceSpec(**settings)


# ------------------------------------------------------------------------------------------
# Sliding windows.


@pytest.mark.parametrize('fn,sizes', [
    # Non-square, not multiples of the stride, exactly the crop, narrower / shorter than the crop.
    ('local', [(20, 27), (8, 6), (13, 5), (5, 17)]),
    # Windows holding only image pixels (every side >= crop): the mixing fn must match exactly.
    ('mixing', [(20, 27), (8, 6), (16, 16), (11, 23)]),
])
def test_slide_inference_matches_mmseg_loop(fn, sizes):
  rng = np.random.default_rng(0)
  crop, stride = (8, 6), (5, 4)
  batch = make_batch(rng, sizes, bucket=(24, 32))
  score = {'local': local_scores, 'mixing': mixing_scores}[fn]
  got = jax.jit(lambda x, s: inference.slide_inference(
      lambda c: score(jnp, c), x, s, crop_size=crop, stride=stride, num_classes=K))(
          batch['image'], batch['image_size'])
  assert got.shape == (len(sizes), 24, 32, K)
  for i, (h, w) in enumerate(sizes):
    want = np_slide(score, batch['image'][i, :h, :w], crop, stride)
    np.testing.assert_allclose(np.asarray(got[i, :h, :w]), want, rtol=1e-5, atol=1e-5)


def test_slide_inference_bucket_smaller_than_crop():
  rng = np.random.default_rng(1)
  batch = make_batch(rng, [(5, 4), (3, 6)], bucket=(6, 6))
  got = inference.slide_inference(lambda c: local_scores(jnp, c), batch['image'],
                                 batch['image_size'], crop_size=(8, 8), stride=(4, 4),
                                 num_classes=K)
  assert got.shape == (2, 6, 6, K)
  for i, (h, w) in enumerate([(5, 4), (3, 6)]):
    want = np_slide(local_scores, batch['image'][i, :h, :w], (8, 8), (4, 4))
    np.testing.assert_allclose(np.asarray(got[i, :h, :w]), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Dynamic-size resize, flip, test resize rule.


def test_dynamic_resize_matches_resize_bilinear_and_torch():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 12, 16, 3)).astype(np.float32)
  in_sizes = np.array([[12, 16], [7, 9], [5, 16], [12, 3]], np.int32)
  out_sizes = np.array([[20, 25], [7, 9], [3, 4], [17, 2]], np.int32)  # up, same, down, mixed
  got = jax.jit(lambda *a: inference.resize_bilinear_dynamic(*a, (24, 26)))(x, in_sizes, out_sizes)
  got = np.asarray(got)
  for i, ((h, w), (ho, wo)) in enumerate(zip(in_sizes, out_sizes)):
    region = x[i, :h, :w]
    ours = np.asarray(resize.resize_bilinear(jnp.asarray(region[None]), (ho, wo)))[0]
    np.testing.assert_allclose(got[i, :ho, :wo], ours, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[i, :ho, :wo], torch_resize(region, (ho, wo)), rtol=1e-5,
                               atol=1e-5)
    assert not got[i, ho:].any() and not got[i, :, wo:].any()


def torch_matrix(out_size, in_size):
  """PyTorch's bilinear resize (align_corners=False) of the identity: its (out, in) matrix."""
  eye = torch.eye(in_size, dtype=torch.float32)[None, :, :, None]  # (1, C = in, H = in, 1)
  out = F.interpolate(eye, size=(out_size, 1), mode='bilinear', align_corners=False)
  return out[0, :, :, 0].T.numpy()


def taps_matrix(taps, in_max):
  """The (out, in) matrix that `inference.dynamic_bilinear_taps`' taps apply."""
  lo, hi, w_lo, w_hi = (np.asarray(t) for t in taps)
  m = np.zeros((lo.shape[0], in_max), np.float32)
  rows = np.arange(lo.shape[0])
  m[rows, lo] += w_lo
  m[rows, hi] += w_hi
  return m


def test_dynamic_taps_equal_torch_and_static_matrix():
  for out_size, in_size in [(9, 4), (4, 9), (683, 2048), (1333, 999), (5, 5)]:
    args = (jnp.int32(out_size), jnp.int32(in_size))
    # Compiled as users' programs are (tests compile at -O0, which can move a last bit).
    taps = jax.jit(inference.dynamic_bilinear_taps, static_argnums=2).lower(
        *args, out_size + 3).compile(PRODUCT_COMPILER_OPTIONS)(*args)
    assert int(np.max(taps[0])) < in_size and int(np.max(taps[1])) < in_size
    m = taps_matrix(taps, in_size + 2)
    # Same float32 index arithmetic as PyTorch: bit-exact weights.
    np.testing.assert_array_equal(m[:out_size, :in_size], torch_matrix(out_size, in_size))
    # resize.py computes the source index in float64: equal up to float32 rounding of it.
    np.testing.assert_allclose(m[:out_size, :in_size], resize.bilinear_matrix(out_size, in_size),
                               atol=1e-4)
    assert not m[out_size:].any() and not m[:, in_size:].any()


def test_flip_valid():
  x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5, 1)
  got = np.asarray(inference.flip_valid(jnp.asarray(x), jnp.array([5, 3])))
  np.testing.assert_array_equal(got[0], x[0, :, ::-1])
  np.testing.assert_array_equal(got[1, :, :3], x[1, :, 2::-1])
  assert not got[1, :, 3:].any()


@pytest.mark.parametrize('img_scale,min_size', [((2048, 640), 0), ((2048, 512), 512),
                                                ((520, 520), 480)])
def test_scaled_bucket_holds_every_scaled_image(img_scale, min_size):
  rng = np.random.default_rng(9)
  sizes = np.concatenate([rng.integers(100, 1500, size=(200, 2)), [[375, 500], [200, 900]]])
  for ratio in (0.5, 0.75, 1.25, 1.5, 1.75):
    scale_r = mmcv_reference.ratio_scale(img_scale, ratio)
    for h, w in sizes:
      size_1 = mmcv_rescale_size(int(h), int(w), img_scale, min_size)
      size_r = mmcv_rescale_size(int(h), int(w), scale_r, min_size)
      bucket = inference.scaled_bucket(size_1, img_scale, ratio, min_size, (0, 0))
      assert size_r[0] <= bucket[0] and size_r[1] <= bucket[1], (h, w, ratio, bucket)
      assert bucket[0] % 32 == 0 and bucket[1] % 32 == 0
      # Not wastefully loose either: within a few percent of the tightest possible bucket.
      assert bucket[0] <= size_1[0] * max(ratio, 1) * 1.04 + 40


# ------------------------------------------------------------------------------------------
# predict and the eval loop.


@pytest.mark.parametrize('mode', ['slide', 'whole'])
def test_predict_matches_reference(mode):
  rng = np.random.default_rng(4)
  image_sizes = [(20, 27), (9, 6), (16, 11)]
  label_sizes = [(15, 30), (9, 6), (25, 13)]  # down, same and up-sampling to the label size
  batch = make_batch(rng, image_sizes, (24, 32), label_sizes, (28, 32),
                     pad_value=None if mode == 'slide' else 0.0)
  spec = inference_spec(mode=mode)
  fn = jax.jit(lambda b: (inference.predict_probs(lambda x: local_scores(jnp, x), b, spec),
                          inference.predict(lambda x: local_scores(jnp, x), b, spec)))
  probs, labels = (np.asarray(a) for a in fn(batch))
  assert probs.shape == (3, 28, 32, K) and labels.shape == (3, 28, 32) and labels.dtype == np.int32
  for i, ((h, w), (lh, lw)) in enumerate(zip(image_sizes, label_sizes)):
    img = batch['image'][i, :h, :w]
    if mode == 'slide':
      want = np_probs(local_scores, img, (lh, lw), (8, 6), (5, 4))
    else:  # whole: the fn is pointwise in position, so the padded bucket does not matter
      want = softmax(torch_resize(local_scores(np, img[None].astype(np.float64))[0], (lh, lw)))
    np.testing.assert_allclose(probs[i, :lh, :lw], want, atol=2e-5)
    top2 = np.sort(want, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4
    np.testing.assert_array_equal(labels[i, :lh, :lw][clear], want.argmax(-1)[clear])
    assert (labels[i, lh:] == IGNORE).all() and (labels[i, :, lw:] == IGNORE).all()


def reference_metrics(preds, labels):
  """mIoU / mAcc / aAcc from flat pixel lists, independently of segvit_jax.evaluation.metrics."""
  inter, area_pred, area_label = np.zeros(K), np.zeros(K), np.zeros(K)
  for p, lbl in zip(preds, labels):
    keep = lbl != IGNORE
    p, lbl = p[keep], lbl[keep]
    inter += np.bincount(p[p == lbl], minlength=K)
    area_pred += np.bincount(p, minlength=K)
    area_label += np.bincount(lbl, minlength=K)
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = inter / (area_pred + area_label - inter)
    acc = inter / area_label
  return {'miou': np.nanmean(iou), 'macc': np.nanmean(acc),
          'aacc': inter.sum() / area_label.sum(), 'iou': iou}


def test_eval_loop_matches_numpy_metrics():
  rng = np.random.default_rng(5)
  crop, stride = (8, 6), (5, 4)
  batches = [
      make_batch(rng, [(20, 27), (9, 6)], (24, 32), [(15, 30), (9, 6)], (28, 32)),
      make_batch(rng, [(16, 11), (12, 12)], (24, 32), [(25, 13), (12, 20)], (28, 32)),
  ]
  batches[1]['valid'][1] = False  # a padding example of the last batch: must not count
  step = eval_loop.make_eval_step(FakeModel('mixing'), inference_spec())
  got = eval_loop.evaluate(step, {}, iter(batches), num_classes=K, class_names=list('abcd'))
  preds, labels = [], []
  for batch in batches:
    for i in range(2):
      if not batch['valid'][i]:
        continue
      (h, w), (lh, lw) = batch['image_size'][i], batch['label_size'][i]
      probs = np_probs(mixing_scores, batch['image'][i, :h, :w], (lh, lw), crop, stride)
      top2 = np.sort(probs, -1)[..., -2:]
      assert (top2[..., 1] - top2[..., 0]).min() > 1e-5  # no near ties: argmax is well defined
      preds.append(probs.argmax(-1).ravel())
      labels.append(batch['label'][i, :lh, :lw].ravel())
  want = reference_metrics(preds, labels)
  assert got['num_batches'] == 2
  assert got['confusion_matrix'].sum() == sum((lbl != IGNORE).sum() for lbl in labels)
  for key in ('miou', 'macc', 'aacc'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
  np.testing.assert_allclose(got['per_class_iou'], want['iou'], rtol=1e-12)
  assert got['class_names'] == tuple('abcd')


def test_flip_tta_matches_reference():
  rng = np.random.default_rng(6)
  image_sizes, label_sizes = [(20, 27), (9, 14)], [(15, 30), (9, 14)]
  batch = make_batch(rng, image_sizes, (24, 32), label_sizes, (16, 32))
  spec = inference_spec(multi_scale=True, scales=(1.0,), flip=True)
  probs = np.asarray(jax.jit(lambda b: inference.predict_probs(
      lambda x: local_scores(jnp, x), b, spec))(batch))
  for i, ((h, w), (lh, lw)) in enumerate(zip(image_sizes, label_sizes)):
    img = batch['image'][i, :h, :w]
    want = (np_probs(local_scores, img, (lh, lw), (8, 6), (5, 4)) +
            np_probs(local_scores, img, (lh, lw), (8, 6), (5, 4), flip=True)) / 2
    np.testing.assert_allclose(probs[i, :lh, :lw], want, atol=2e-5)


def test_multi_scale_flip_tta_equals_single_scale_for_pointwise_fn():
  # Images of two flat colours (left / right halves) at original sizes; the batch holds them
  # resized by the test rule, as the pipeline does. A pointwise score fn gives the same
  # probabilities at every scale and flip, except near the colour boundary.
  img_scale, min_size = (48, 16), 0
  orig_sizes = [(12, 20), (21, 14), (16, 16)]
  bucket, label_bucket = (32, 64), (24, 24)
  image_sizes = [evaluate_sizes(s, img_scale, min_size) for s in orig_sizes]
  images = np.zeros((3, *bucket, 3), np.float32)
  colours = [np.array([-1, -1, -1]), np.array([1, 1, 1]), np.array([-1, 1, -1])]
  for i, ((oh, ow), (h, w)) in enumerate(zip(orig_sizes, image_sizes)):
    orig = np.empty((oh, ow, 3))
    orig[:, :ow // 2] = colours[i]
    orig[:, ow // 2:] = colours[(i + 1) % 3]
    images[i, :h, :w] = torch_resize(orig, (h, w))
  scales = (0.5, 1.0, 1.5)
  # The sizes at each ratio, as the input pipeline computes them from the original size.
  scaled = [[mmcv_rescale_size(*s, mmcv_reference.ratio_scale(img_scale, r), min_size)
             for r in scales] for s in orig_sizes]
  batch = {'image': images, 'image_size': np.array(image_sizes, np.int32),
           'scaled_size': np.array(scaled, np.int32),
           'label': np.zeros((3, *label_bucket), np.int32),
           'label_size': np.array(orig_sizes, np.int32)}
  base = inference_spec(crop_size=(16, 16), stride=(8, 8), test_img_scale=img_scale,
                        test_min_size=min_size)
  tta = dataclasses.replace(base, multi_scale=True, flip=True, scales=scales)

  def run(spec):
    return jax.jit(lambda b: inference.predict_probs(
        lambda x: colour_scores(jnp, x), b, spec))(batch)

  single, multi = np.asarray(run(base)), np.asarray(run(tta))
  for i, (oh, ow) in enumerate(orig_sizes):
    far = np.abs(np.arange(ow) + 0.5 - ow / 2) > 3  # columns away from the boundary
    np.testing.assert_allclose(multi[i, :oh, :ow][:, far], single[i, :oh, :ow][:, far], atol=1e-5)
    assert (multi[i, :oh, :ow].argmax(-1)[:, far] == single[i, :oh, :ow].argmax(-1)[:, far]).all()
    assert not multi[i, oh:].any() and not multi[i, :, ow:].any()
  with pytest.raises(ValueError, match='test_img_scale'):
    dataclasses.replace(tta, test_img_scale=())
  no_sizes = {k: v for k, v in batch.items() if k != 'scaled_size'}
  with pytest.raises(ValueError, match='scaled_size'):
    inference.predict_probs(lambda x: colour_scores(jnp, x), no_sizes, tta)


def evaluate_sizes(size, img_scale, min_size):
  return mmcv_rescale_size(size[0], size[1], img_scale, min_size)


class _PixelModel(nn.Module):
  """Parameter-free (B, H, W, 3) -> (B, H, W, 4) scores that also read each image's mean."""

  @nn.compact
  def __call__(self, x, *, train):
    k = jnp.arange(4.0)
    return (x[..., :1] * (k - 1.5) + x[..., 1:2] * jnp.cos(k)
            + x.mean((1, 2))[:, None, None, 2:] * k)


def test_eval_step_on_a_4_device_mesh_matches_single_device():
  spec = inference_spec(crop_size=(8, 8), stride=(5, 5))
  rng = np.random.default_rng(0)
  sizes = np.array([[20, 27], [9, 8], [16, 11], [12, 30]], np.int32)
  batch = {'image': rng.normal(size=(4, 24, 32, 3)).astype(np.float32), 'image_size': sizes,
           'label': rng.integers(0, 4, size=(4, 24, 32)).astype(np.int32), 'label_size': sizes,
           'valid': np.array([True, True, False, True])}
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P('data'))) for k, v in batch.items()}
  step = eval_loop.make_eval_step(_PixelModel(), spec)
  conf = step({}, sharded, eval_loop.zeros_confusion(4, mesh))
  assert conf.sharding.is_fully_replicated, conf.sharding
  single = eval_loop.evaluate(step, {}, [batch, batch], num_classes=4)['confusion_matrix']
  multi = eval_loop.evaluate(step, {}, [sharded, sharded], num_classes=4)['confusion_matrix']
  np.testing.assert_array_equal(single, multi)
  np.testing.assert_array_equal(single, 2 * np.asarray(conf))
  assert single.sum() > 0


def test_bad_config_errors():
  with pytest.raises(ValueError, match='test_img_scale'):
    eval_loop.make_eval_step(FakeModel(), inference_spec(multi_scale=True))
  batch = make_batch(np.random.default_rng(0), [(8, 8)], (8, 8))
  with pytest.raises(ValueError, match='mode'):
    inference.predict(lambda x: local_scores(jnp, x), batch, inference_spec(mode='x'))


# ------------------------------------------------------------------------------------------
# The real model end to end.


def test_make_eval_step_with_tiny_segvit_matches_window_loop():
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  k = 3
  model_config = config_lib.get_base_config().model
  model_config.update(dict(embed_dim=32, depth=2, num_heads=2, out_indices=(0, 1), use_stages=2,
                           decoder_dim=32, decoder_heads=2, decoder_layers=1, num_classes=k,
                           img_size=(32, 32)))
  model = segvit.build_model(model_config)
  # Random weights x 3: a random tiny SegViT otherwise predicts one class everywhere.
  init = jax.jit(lambda key: jax.tree.map(lambda p: 3 * p, nn.unbox(
      model.init({'params': key}, jnp.zeros((1, 32, 32, 3)), train=False))))
  variables = init(jax.random.key(3))  # a key whose model predicts 2 of the 3 classes here
  spec = inference_spec(crop_size=(32, 32), stride=(21, 21), num_classes=k)
  rng = np.random.default_rng(8)
  image_sizes, label_sizes = [(48, 61), (32, 40)], [(40, 50), (35, 40)]
  batch = make_batch(rng, image_sizes, (48, 64), label_sizes, (40, 56))
  batch['label'] = np.where(batch['label'] == IGNORE, IGNORE, batch['label'] % k)

  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  score_np = lambda xp, crops: np.asarray(apply(jnp.asarray(crops, jnp.float32)), np.float64)
  preds, labels = [], []
  for i, ((h, w), (lh, lw)) in enumerate(zip(image_sizes, label_sizes)):
    scores = np_slide(score_np, batch['image'][i, :h, :w], (32, 32), (21, 21), k)
    probs = softmax(torch_resize(scores, (lh, lw)))
    top2 = np.sort(probs, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-6  # float32 noise is ~1e-7: no ties
    preds.append(probs.argmax(-1).ravel())
    labels.append(batch['label'][i, :lh, :lw].ravel())
  assert len(np.unique(np.concatenate(preds))) >= 2  # the comparison below is informative

  step = eval_loop.make_eval_step(model, spec)
  got = eval_loop.evaluate(step, variables, [batch], num_classes=k)
  conf = np.zeros((k, k), np.int64)
  for p, lbl in zip(preds, labels):
    np.add.at(conf, (lbl[lbl != IGNORE], p[lbl != IGNORE]), 1)
  np.testing.assert_array_equal(got['confusion_matrix'], conf)
