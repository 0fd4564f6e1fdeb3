"""Prediction on files: outputs, bucketing, corrupt inputs, consistency with evaluation."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from segvit_jax import checkpoint
from segvit_jax import config_base
from segvit_jax import evaluate
from segvit_jax import predict
from segvit_jax import visualize
from segvit_jax.models import segvit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3
# (name, (h, w)): three sizes, three aspect ratios, two formats.
IMAGES = (('wide.jpg', (40, 56)), ('square.png', (64, 64)), ('strip.png', (30, 90)))


def tiny_config():
  config = config_base.get_base_config()
  config.model.update(dict(embed_dim=32, depth=2, num_heads=2, out_indices=(0, 1), use_stages=2,
                           decoder_dim=32, decoder_heads=2, decoder_layers=1, num_classes=K,
                           img_size=(32, 32), drop_path_rate=0.0))
  d = config.dataset
  d.name, d.num_classes = 'synthetic', K
  d.test_img_scale = (64, 32)  # short side 32, long side at most 64
  d.test_min_size = 0
  e = config.eval
  e.mode, e.crop_size, e.stride = 'slide', (32, 32), (16, 16)
  e.scales = (0.75, 1.0)
  return config


def random_params(abstract, seed=0):
  # numpy instead of a jitted `model.init` (which takes ~15 s to compile on a busy CPU). Matrices
  # have unit-gain fan-in scaling; the model then predicts several classes on the test images.
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    if str(path[-1].key) == 'scale':
      return (1 + 0.1 * rng.normal(size=a.shape)).astype(np.float32)
    std = 0.1 if len(a.shape) == 1 else 1 / np.sqrt(a.shape[0])
    return (std * rng.normal(size=a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def assert_same_argmax(labels, probs):
  # Equal wherever the top two classes are not tied to float32 noise (nearly every pixel).
  top2 = np.sort(probs, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-5
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(labels[clear], probs.argmax(-1)[clear])


def _image(rng, h, w):
  # Smooth colour ramps plus a few flat blocks: a random tiny model then predicts several classes.
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 5.0)], -1)
  for _ in range(3):
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
  return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  base = tmp_path_factory.mktemp('predict')
  config = tiny_config()
  params = random_params(nn.unbox(segvit.abstract_params(segvit.build_model(config.model))))
  ckpt = str(base / 'ckpt')
  checkpoint.export_params(ckpt, params, config, {'source': 'test'})
  inputs = base / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  originals = {}
  for name, (h, w) in IMAGES:
    img = _image(rng, h, w)
    Image.fromarray(img).save(inputs / name, quality=95)
    originals[name] = np.asarray(Image.open(inputs / name).convert('RGB'))  # after JPEG coding
  (inputs / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG' + bytes(64))
  return {'ckpt': ckpt, 'inputs': str(inputs), 'originals': originals, 'params': params,
          'config': config, 'base': base}


@pytest.fixture(scope='module')
def predictor(setup):
  return predict.load(setup['ckpt'])


def direct_probs(predictor, image, eval_config):
  """evaluate.predict_probs on one unpadded image, bypassing buckets and batching."""
  d = predictor.config.dataset
  h, w = image.shape[:2]
  size = predict.test_resize_size((h, w), tuple(d.test_img_scale), d.test_min_size)
  x = (predict.resize_linear(image, size) - 127.5) / 127.5
  batch = {'image': jnp.asarray(x[None], jnp.float32), 'image_size': jnp.asarray([size]),
           'label_size': jnp.asarray([[h, w]])}
  fn = jax.jit(lambda v, b: evaluate.predict_probs(
      lambda im: predictor.model.apply(v, im, train=False), b, eval_config=eval_config,
      num_classes=K, test_img_scale=tuple(d.test_img_scale), test_min_size=d.test_min_size,
      output_shape=(h, w)))
  return np.asarray(fn(predictor.variables, batch))[0]


def test_cli_writes_every_readable_image_and_names_the_corrupt_one(setup):
  out = setup['base'] / 'cli_out'
  cmd = [sys.executable, '-m', 'segvit_jax.predict', f'--checkpoint={setup["ckpt"]}',
         setup['inputs'], f'--output={out}', '--batch_size=2', '--scores']
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'broken' in proc.stderr  # named, with the reason
  assert 'Segmented 3 images, 1 skipped' in proc.stdout, proc.stdout
  assert not (out / 'labels' / 'broken.png').exists()
  for name, (h, w) in IMAGES:
    stem = os.path.splitext(name)[0]
    labels = np.asarray(Image.open(out / 'labels' / f'{stem}.png'))
    assert labels.shape == (h, w) and labels.dtype == np.uint8
    assert labels.max() < K
    ov = Image.open(out / 'overlays' / f'{stem}.png')
    assert ov.mode == 'RGB' and ov.size == (w, h)
    scores = np.load(out / 'scores' / f'{stem}.npy')
    assert scores.shape == (h, w, K) and scores.dtype == np.float16
    np.testing.assert_allclose(scores.astype(np.float32).sum(-1), 1.0, atol=5e-3)
    top2 = np.sort(scores.astype(np.float32), -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2  # float16 may tie near-equal classes
    np.testing.assert_array_equal(labels[clear], scores.argmax(-1)[clear])


def test_segment_matches_evaluate_and_compiles_once_per_bucket(setup, predictor):
  paths = [os.path.join(setup['inputs'], n) for n, _ in IMAGES]
  paths.insert(1, os.path.join(setup['inputs'], 'broken.jpg'))
  summary = predict.Summary()
  results = predict.segment(paths, predictor, batch_size=2, scores=True,
                            scores_dtype=np.float32, summary=summary)
  assert results[1] is None and [n for n, _ in summary.skipped] == [paths[1]]
  good = [r for r in results if r is not None]
  assert len(good) == 3 and summary.images == 3
  # The three images fall into fewer buckets than images; one compilation per bucket.
  assert 1 <= summary.compilations <= len(summary.buckets) < 3
  for result, (name, (h, w)) in zip(good, IMAGES):
    assert result['labels'].shape == (h, w) and result['overlay'].shape == (h, w, 3)
    assert result['scores'].shape == (h, w, K)
  # The 40x56 image is resized to 32x45 and padded to its 32x64 bucket, batched with the 30x90
  # one: the padding and the batch must not change its probabilities.
  name = IMAGES[0][0]
  probs = direct_probs(predictor, setup['originals'][name], predictor.config.eval)
  np.testing.assert_allclose(good[0]['scores'], probs, atol=1e-5)
  assert_same_argmax(good[0]['labels'], probs)
  assert len(np.unique(np.concatenate([r['labels'].ravel() for r in good]))) >= 2

  # Same shapes again, as arrays and PIL images: nothing is compiled.
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if 'backend_compile' in event else None)
  again = predict.Summary()
  arrays = [setup['originals'][n] for n, _ in IMAGES]
  second = predict.segment([arrays[0], Image.fromarray(arrays[1]), arrays[2]], predictor,
                           batch_size=2, scores=True, scores_dtype=np.float32, summary=again)
  assert again.compilations == 0 and not compiles, compiles
  for a, b in zip(good, second):
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_overlay_blends_image_and_palette(predictor):
  image = np.full((2, 3, 3), 100, np.uint8)
  labels = np.array([[0, 1, 2], [2, 1, 0]])
  got = visualize.overlay(image, labels, predictor.palette)
  want = np.round(0.5 * 100 + 0.5 * predictor.palette[labels].astype(np.float64))
  np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_tta_matches_evaluate(setup, predictor):
  name, (h, w) = IMAGES[2]
  image = setup['originals'][name]
  result, = predict.segment([image], predictor, tta=True, scores=True, scores_dtype=np.float32)
  eval_config = predictor.eval_config(tta=True)
  assert eval_config.multi_scale and eval_config.flip
  probs = direct_probs(predictor, image, eval_config)
  np.testing.assert_allclose(result['scores'], probs, atol=1e-5)
  assert_same_argmax(result['labels'], probs)
  plain = direct_probs(predictor, image, predictor.config.eval)
  assert np.abs(plain - probs).max() > 1e-3  # the augmentations changed something


def test_training_workdir_restores_params_only(setup, predictor, tmp_path):
  params = setup['params']
  state = {'step': np.int32(7), 'params': params,
           'opt_state': ({'mu': jax.tree.map(np.zeros_like, params)}, {'count': np.int32(7)})}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(7, jax.tree.map(jnp.asarray, state))
  ckpt.close()
  checkpoint.write_config(str(tmp_path / 'config.json'), setup['config'])  # as the trainer does
  loaded = predict.load(str(tmp_path))
  assert loaded.config.eval.crop_size == (32, 32)
  assert loaded.config.model.to_dict() == setup['config'].model.to_dict()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables['params']),
               params)


def test_test_resize_size_agrees_with_evaluate_rule():
  sizes = np.array([(40, 56), (64, 64), (30, 90), (512, 683), (1200, 300), (7, 9)])
  for scale, min_size in (((64, 32), 0), ((2048, 512), 0), ((2048, 512), 640)):
    want = np.asarray(evaluate.rescale_size(sizes, scale, min_size))
    got = np.array([predict.test_resize_size(s, scale, min_size) for s in sizes])
    np.testing.assert_array_equal(got, want)


def test_resize_linear_is_opencv_bilinear():
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
  for size in ((20, 30), (37, 53), (64, 90), (11, 200)):
    got = predict.resize_linear(image, size)
    assert got.shape == (*size, 3) and np.all(got == np.round(got))
    # PyTorch's bilinear (align_corners=False) is OpenCV's formula with exact weights; OpenCV
    # quantises them to 1/2048, which moves a rounded pixel by at most 1.
    want = torch.nn.functional.interpolate(
        torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None], size=size,
        mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 1.0


def test_find_inputs_recurses_and_deduplicates(tmp_path):
  (tmp_path / 'a' / 'sub').mkdir(parents=True)
  for p in ('a/x.jpg', 'a/x.png', 'a/sub/y.png', 'a/notes.txt', 'z.png'):
    (tmp_path / p).write_bytes(b'')
  found = predict.find_inputs([str(tmp_path / 'a'), str(tmp_path / 'z.png')])
  assert [n for _, n in found] == ['x', 'x-1', 'sub/y', 'z']
  with pytest.raises(FileNotFoundError, match='nope'):
    predict.find_inputs([str(tmp_path / 'nope')])
