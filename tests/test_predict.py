"""Prediction on files: outputs, bucketing, corrupt inputs, consistency with evaluation."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import mmcv_reference
from segvit_jax import config as config_lib
from segvit_jax.checkpoint import parameters
from segvit_jax.checkpoint import training_checkpoints
from segvit_jax.data import mmseg_rules
from segvit_jax import predict
from segvit_jax.evaluation import inference
from segvit_jax.evaluation import predictor as predictor_lib
from segvit_jax.evaluation import visualize
from segvit_jax.models import segvit

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3
# (name, (h, w)): three sizes, three aspect ratios, two formats.
IMAGES = (('wide.jpg', (40, 56)), ('square.png', (64, 64)), ('strip.png', (30, 90)))


def tiny_config():
  config = config_lib.get_base_config()
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


@pytest.fixture(scope='session')
def setup(tmp_path_factory):
  base = tmp_path_factory.mktemp('predict')
  config = tiny_config()
  params = random_params(nn.unbox(segvit.abstract_params(segvit.build_model(config.model))))
  ckpt = str(base / 'ckpt')
  parameters.export_params(ckpt, params, config, {'source': 'test'})
  inputs = base / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  originals = {}
  for name, (h, w) in IMAGES:
    img = _image(rng, h, w)
    Image.fromarray(img).save(inputs / name, quality=95)
    originals[name] = mmcv_reference.imdecode((inputs / name).read_bytes())  # as mmseg reads it
  (inputs / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG' + bytes(64))
  return {'ckpt': ckpt, 'inputs': str(inputs), 'originals': originals, 'params': params,
          'config': config, 'base': base}


@pytest.fixture(scope='session')
def predictor(setup):
  return predictor_lib.load(setup['ckpt'])


def direct_probs(predictor, image, spec):
  """inference.predict_probs on one unpadded image, bypassing buckets and batching."""
  d = predictor.config.dataset
  h, w = image.shape[:2]
  scale = tuple(d.test_img_scale)
  size = mmcv_reference.rescale_size(h, w, scale, d.test_min_size)
  x = mmcv_reference.imnormalize(mmcv_reference.imresize_linear(image, *size), d.mean, d.std)
  scaled = [mmcv_reference.rescale_size(h, w, mmcv_reference.ratio_scale(scale, r),
                                        d.test_min_size) for r in spec.scales]
  batch = {'image': jnp.asarray(x[None], jnp.float32), 'image_size': jnp.asarray([size]),
           'scaled_size': jnp.asarray([scaled]), 'label_size': jnp.asarray([[h, w]])}
  fn = jax.jit(lambda v, b: inference.predict_probs(
      lambda im: predictor.model.apply(v, im, train=False), b, spec, output_shape=(h, w)))
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
  summary = predictor_lib.Summary()
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
  probs = direct_probs(predictor, setup['originals'][name], predictor.spec)
  np.testing.assert_allclose(good[0]['scores'], probs, atol=1e-5)
  assert_same_argmax(good[0]['labels'], probs)
  assert len(np.unique(np.concatenate([r['labels'].ravel() for r in good]))) >= 2

  # Same shapes again, as arrays and PIL images: nothing is compiled.
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if 'backend_compile' in event else None)
  again = predictor_lib.Summary()
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
  spec = predictor.spec.with_tta()
  assert spec.multi_scale and spec.flip
  probs = direct_probs(predictor, image, spec)
  np.testing.assert_allclose(result['scores'], probs, atol=1e-5)
  assert_same_argmax(result['labels'], probs)
  plain = direct_probs(predictor, image, predictor.spec)
  assert np.abs(plain - probs).max() > 1e-3  # the augmentations changed something


def test_training_workdir_restores_params_only(setup, predictor, tmp_path):
  params = setup['params']
  state = {'step': np.int32(7), 'params': params,
           'opt_state': ({'mu': jax.tree.map(np.zeros_like, params)}, {'count': np.int32(7)})}
  ckpt = training_checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(7, jax.tree.map(jnp.asarray, state))
  ckpt.close()
  config_lib.write_config(str(tmp_path / 'config.json'), setup['config'])  # as the trainer does
  loaded = predictor_lib.load(str(tmp_path))
  assert loaded.config.eval.crop_size == (32, 32)
  assert loaded.config.model.to_dict() == setup['config'].model.to_dict()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables['params']),
               params)


# ------------------------------------------------------------------------------------------------
# Images are read as mmseg reads them (OpenCV's IMREAD_COLOR).


def _photo_crop(y, x, h=48, w=40):
  return np.ascontiguousarray(mmcv_reference.photo()[y:y + h, x:x + w])


def test_read_image_is_opencv_decoding(tmp_path):
  variants = mmcv_reference.image_variants(_photo_crop(100, 200))
  for name in ('jpeg baseline 4:2:0', 'jpeg exif orientation 6', 'png 16-bit grey',
               'png palette + tRNS', 'png rgba'):
    path = tmp_path / 'image'
    path.write_bytes(variants[name])
    np.testing.assert_array_equal(predictor_lib.read_image(str(path)),
                                  mmcv_reference.imdecode(variants[name]), err_msg=name)
  pil = Image.open(tmp_path / 'image')
  np.testing.assert_array_equal(predictor_lib.read_image(pil), mmseg_rules.image_to_rgb(pil))


def test_jpeg_gives_the_labels_of_a_png_of_opencvs_decoding(tmp_path, predictor):
  paths = []
  for i, (y, x) in enumerate(((40, 180), (200, 120), (330, 260))):
    crop = _photo_crop(y, x)
    jpeg = mmcv_reference.encode(crop, 'JPEG', quality=85)
    if i == 2:  # a camera JPEG that must be rotated
      jpeg = mmcv_reference.with_orientation(Image.fromarray(crop), 'JPEG', 8)
    (tmp_path / f'{i}.jpg').write_bytes(jpeg)
    (tmp_path / f'{i}.png').write_bytes(
        mmcv_reference.encode(mmcv_reference.imdecode(jpeg), 'PNG'))
    paths += [str(tmp_path / f'{i}.jpg'), str(tmp_path / f'{i}.png')]
  results = predict.segment(paths, predictor, scores=True, scores_dtype=np.float32)
  for jpeg, png in zip(results[::2], results[1::2]):
    np.testing.assert_array_equal(jpeg['labels'], png['labels'])
    np.testing.assert_array_equal(jpeg['scores'], png['scores'])  # the very same model input
    assert jpeg['scores'].std(axis=(0, 1)).min() > 1e-4  # scores that depend on the pixels
  assert results[4]['labels'].shape == (40, 48)  # rotated as OpenCV rotates it


def test_16_bit_png_gives_the_labels_of_its_8_bit_version(tmp_path, predictor):
  crop = _photo_crop(150, 150, 56, 64)
  (tmp_path / '8.png').write_bytes(mmcv_reference.encode(crop, 'PNG'))
  (tmp_path / '16.png').write_bytes(mmcv_reference.encode_png16(mmcv_reference.to_16bit(crop)))
  (tmp_path / '16g.png').write_bytes(
      mmcv_reference.encode_png16(mmcv_reference.to_16bit(crop[..., 1].copy())))
  (tmp_path / '8g.png').write_bytes(mmcv_reference.encode(crop[..., 1], 'PNG'))
  white = np.full_like(crop, 255)
  eight, sixteen, sixteen_grey, eight_grey, blank = predict.segment(
      [str(tmp_path / n) for n in ('8.png', '16.png', '16g.png', '8g.png')] + [white], predictor,
      scores=True, scores_dtype=np.float32)
  assert np.mean(eight['labels'] == sixteen['labels']) >= 0.99
  assert np.mean(eight_grey['labels'] == sixteen_grey['labels']) >= 0.99
  # OpenCV's high-byte rule: the very same 8-bit image, not the white one Pillow makes of grey.
  np.testing.assert_array_equal(sixteen['scores'], eight['scores'])
  np.testing.assert_array_equal(sixteen_grey['scores'], eight_grey['scores'])
  assert np.abs(sixteen_grey['scores'] - blank['scores']).max() > 1e-3


def test_find_inputs_recurses_and_deduplicates(tmp_path):
  (tmp_path / 'a' / 'sub').mkdir(parents=True)
  for p in ('a/x.jpg', 'a/x.png', 'a/sub/y.png', 'a/notes.txt', 'z.png'):
    (tmp_path / p).write_bytes(b'')
  found = predict.find_inputs([str(tmp_path / 'a'), str(tmp_path / 'z.png')])
  assert [n for _, n in found] == ['x', 'x-1', 'sub/y', 'z']
  with pytest.raises(FileNotFoundError, match='nope'):
    predict.find_inputs([str(tmp_path / 'nope')])


def test_find_inputs_skips_the_output_folder(tmp_path):
  (tmp_path / 'in' / 'out' / 'labels').mkdir(parents=True)
  (tmp_path / 'in' / 'sub').mkdir()
  for p in ('in/a.jpg', 'in/sub/b.png', 'in/out/labels/a.png', 'in/out/overlays.png'):
    (tmp_path / p).write_bytes(b'')
  found = predict.find_inputs([str(tmp_path / 'in')], exclude=str(tmp_path / 'in' / 'out'))
  assert [n for _, n in found] == ['a', 'sub/b']
  assert len(predict.find_inputs([str(tmp_path / 'in')])) == 4
  # Named through another path (a trailing slash, a symlink): still the same folder.
  (tmp_path / 'link').symlink_to(tmp_path / 'in')
  found = predict.find_inputs([str(tmp_path / 'link')], exclude=str(tmp_path / 'in' / 'out') + '/')
  assert [n for _, n in found] == ['a', 'sub/b']


# ------------------------------------------------------------------------------------------------
# The real commands: predict's labels of JPEG photographs, evaluated as ground truth, score 100%.


def _train_tiny_workdir(workdir: str) -> None:
  """A workdir of the tiny synthetic config trained for 2 steps (in this process).

  Slide inference with one 32 x 32 window: prediction and evaluation then pad every image to
  the same bucket. The evaluation command reuses these overrides (`_TINY_EVAL`).
  """
  from segvit_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = tiny_runs.tiny_config(**_TINY_EVAL, num_train_steps=2, checkpoint_every_steps=2)
  loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


_TINY_EVAL = {'eval__mode': 'slide', 'eval__stride': (16, 16),
              'dataset__eval_label_pad_size': (64, 64)}


@pytest.mark.slow
def test_predicted_jpeg_labels_evaluate_as_ground_truth_at_100_percent(tmp_path):
  workdir = str(tmp_path / 'run')
  _train_tiny_workdir(workdir)
  images = tmp_path / 'data' / 'img_dir' / 'val'
  images.mkdir(parents=True)
  for i, (y, x) in enumerate(((40, 180), (200, 120), (330, 260), (500, 20))):
    crop = _photo_crop(y, x, 48 + 4 * i, 60 - 5 * i)
    (images / f'photo_{i}.jpg').write_bytes(mmcv_reference.encode(crop, 'JPEG', quality=80))
  (tmp_path / 'data' / 'img_dir' / 'train').symlink_to(images)
  out = images / 'predictions'  # inside the input folder
  predict_cmd = [sys.executable, '-m', 'segvit_jax.predict', f'--checkpoint={workdir}',
                 str(images), f'--output={out}', '--noprogress']
  for _ in range(2):  # the rerun must not segment its own outputs
    proc = subprocess.run(predict_cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=tiny_runs.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Segmented 4 images in' in proc.stdout, proc.stdout
  labels = tmp_path / 'data' / 'ann_dir' / 'val'
  labels.mkdir(parents=True)
  for i in range(4):
    predicted = np.asarray(Image.open(out / 'labels' / f'photo_{i}.png'))
    assert predicted.shape == (48 + 4 * i, 60 - 5 * i)
    Image.fromarray(predicted).save(labels / f'photo_{i}.png')
  (tmp_path / 'data' / 'ann_dir' / 'train').symlink_to(labels)
  eval_dir = str(tmp_path / 'eval')
  cmd = tiny_runs.main_cmd(eval_dir, **_TINY_EVAL, dataset__source='mmseg_folder',
                           dataset__folder=str(tmp_path / 'data'),
                           dataset__reduce_zero_label=False, init_checkpoint=workdir)
  proc = subprocess.run(cmd + ['--mode=eval'], capture_output=True, text=True, timeout=600,
                        cwd=ROOT, env=tiny_runs.env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(eval_dir, 'eval_metrics.json')) as f:
    result = json.load(f)
  assert result['aacc'] == 1.0, result
