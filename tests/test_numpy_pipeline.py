"""numpy_pipeline.py: the TF-free pipeline of in-memory sources, against the tf.data reference.

The transforms are compared with `augment` / `tf_pipeline` (TensorFlow, the reference behaviour)
fed the same uniforms; the stream rules (order, host rows, resume, reshuffle) on the synthetic
source, whose examples are rendered in memory.
"""

import itertools
import os
import subprocess
import sys
import threading

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest
import tensorflow as tf

import mmcv_reference
from segvit_jax.data import augment
from segvit_jax import config as config_lib
from segvit_jax.data import mmseg_rules
from segvit_jax.data import numpy_augment
from segvit_jax.data import numpy_pipeline
from segvit_jax.data import tf_pipeline
from segvit_jax.data.datasets import synthetic
from segvit_jax.errors import UserError

TRAIN_KW = dict(crop_size=(32, 40), img_scale=(96, 48), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                flip_prob=0.5, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def _blocky_label(rng, h, w, num_classes=6, block=6, ignore_frac=0.1):
  """Piecewise-constant labels with some 255, so that crops pass and fail the ratio check."""
  small = rng.integers(0, num_classes, (-(-h // block), -(-w // block)))
  small[rng.random(small.shape) < ignore_frac] = 255
  return np.kron(small, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def _tf_train_transform(photometric):
  """augment.train_transform traced once for any image size."""
  specs = [tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None], tf.uint8),
           tf.TensorSpec([2], tf.int64)]
  return tf.function(
      lambda i, lbl, s: augment.train_transform(i, lbl, s, photometric=photometric, **TRAIN_KW),
      input_signature=specs)


# ---------------------------------------------------------------------------------------------
# Transforms against the TensorFlow reference.


def test_hsv_steps_equal_tensorflow_kernels():
  """adjust_saturation / adjust_hue reproduce tf.image's float32 CPU kernels bit for bit."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (48, 40, 3)).astype(np.float32)
  image[:8, :, 1] = image[:8, :, 0]  # ties between channels: the kernels' branch order
  image[8:12, :, 2] = image[8:12, :, 0]
  image[12:16] = image[12:16, :, :1]  # greys: no hue
  image[16:18] = 0.0
  for factor in (0.5, 0.93, 1.37, 1.4999):
    np.testing.assert_array_equal(numpy_augment.adjust_saturation(image, np.float32(factor)),
                                  tf.image.adjust_saturation(image, factor).numpy())
  for hue in (-18, -7, 0, 5, 17):
    delta = np.float32(hue) / np.float32(180)
    got = numpy_augment.adjust_hue(image, delta)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, tf.image.adjust_hue(image, delta).numpy(), err_msg=hue)


@pytest.mark.parametrize('photometric', [False, True])
def test_train_transform_equals_augment_given_the_same_uniforms(photometric):
  rng = np.random.default_rng(1)
  reference = _tf_train_transform(photometric)
  mean, std = np.array(TRAIN_KW['mean']), np.array(TRAIN_KW['std'])
  flips = pads = saturated = hued = 0
  for i in range(24):
    h, w = (int(v) for v in rng.integers(20, 90, 2))
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    label = _blocky_label(rng, h, w, num_classes=int(rng.integers(1, 5)))
    seed = np.array([7, i], np.int64)
    expected = {k: v.numpy() for k, v in reference(image, label, seed).items()}
    u = augment.example_uniforms(seed).numpy()
    got = numpy_augment.train_transform(image, label, u, photometric=photometric, **TRAIN_KW)
    assert got['image'].shape == (32, 40, 3) and got['image'].dtype == np.float32
    assert got['label'].shape == (32, 40) and got['label'].dtype == np.int32
    np.testing.assert_array_equal(got['label'], expected['label'])
    if photometric:  # grey levels before Normalize: HSV rounding may move a pixel a little
      levels = [np.round(x['image'] * std + mean) for x in (got, expected)]
      assert np.abs(levels[0] - levels[1]).max() <= 2, i
    else:
      np.testing.assert_array_equal(got['image'], expected['image'])
    params = mmseg_rules.photometric_params(u)
    flips += u[mmseg_rules.SLOT_FLIP] < 0.5
    pads += bool(np.any(got['label'] == 255) and np.all(got['image'][-1, -1] == 0))
    saturated += bool(params['saturation_on'])
    hued += bool(params['hue_on'])
  assert 0 < flips < 24 and pads > 0 and saturated > 0 and hued > 0


def test_crop_acceptance_rule_on_counts():
  def counts(**by_value):
    c = np.zeros(256, np.int64)
    for value, n in by_value.items():
      c[int(value[1:])] = n
    c[255] = 0  # the caller drops the ignore label's count, as mmseg does
    return c

  cases = [(counts(v0=3, v1=1), False),  # 0.75 is not < 0.75
           (counts(v0=2, v1=1), True), (counts(v0=4), False), (counts(), False),
           (counts(v0=1, v1=1, v2=1, v3=1), True), (counts(v0=10, v1=2, v2=2), True)]
  for c, expected in cases:
    assert bool(mmseg_rules.crop_accepted(c, 0.75)) == expected, c.nonzero()
    assert bool(augment.crop_accepted(np.repeat(np.arange(256), c)[None], 0.75)) == expected


def _mmseg_crop_ok(seg, cat_max_ratio=0.75):
  """mmseg RandomCrop's check, as written there: np.unique counts without the ignore index."""
  values, counts = np.unique(seg, return_counts=True)
  counts = counts[values != 255]
  return len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio


def test_crop_choice_and_fallback_equal_augment():
  rng = np.random.default_rng(3)
  crop = (24, 32)
  reference = tf.function(
      lambda lbl, hw, off: augment.choose_crop(lbl, hw, crop, off, 0.75),
      input_signature=[tf.TensorSpec([None, None], tf.uint8), tf.TensorSpec([2], tf.int32),
                       tf.TensorSpec([None, 2], tf.int32)])
  fell_through = accepted_first = 0
  for trial in range(30):
    h, w = (int(v) for v in rng.integers(16, 80, 2))
    label = _blocky_label(rng, h, w, num_classes=int(rng.integers(1, 4)), block=12)
    new_hw = tuple(int(v) for v in rng.integers(16, 90, 2))
    offsets = mmseg_rules.crop_offsets(rng.random((mmseg_rules.CROP_TRIES + 1, 2)), new_hw, crop)
    (y0, x0), window = numpy_augment.choose_crop(label, new_hw, crop, offsets, 0.75)
    ref_y0x0, ref_window = reference(label, new_hw, offsets)
    assert (y0, x0) == tuple(ref_y0x0.numpy()), trial
    np.testing.assert_array_equal(window, ref_window)
    seg = mmcv_reference.imresize_nearest(label, *new_hw)  # cv2
    checks = [_mmseg_crop_ok(seg[y:y + crop[0], x:x + crop[1]]) for y, x in offsets[:-1]]
    chosen = checks.index(True) if any(checks) else mmseg_rules.CROP_TRIES  # else the 11th
    assert (y0, x0) == tuple(offsets[chosen])
    np.testing.assert_array_equal(window, seg[y0:y0 + crop[0], x0:x0 + crop[1]])
    fell_through += not any(checks)
    accepted_first += checks[0]
  assert fell_through > 0 and accepted_first > 0
  # One class everywhere: every checked candidate fails, the last one is used.
  offsets = mmseg_rules.crop_offsets(rng.random((mmseg_rules.CROP_TRIES + 1, 2)), (40, 50), crop)
  y0x0, window = numpy_augment.choose_crop(np.ones((40, 50), np.uint8), (40, 50), crop, offsets,
                                            0.75)
  assert y0x0 == tuple(offsets[-1]) and window.shape == crop
  # cat_max_ratio >= 1: the first candidate, unchecked.
  assert numpy_augment.choose_crop(np.ones((40, 50), np.uint8), (40, 50), crop, offsets,
                                    1.0)[0] == tuple(offsets[0])


def test_eval_transform_equals_tf_pipeline():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (37, 58, 3)).astype(np.uint8)  # non-square, resized up and down
  label = _blocky_label(rng, 37, 58)
  kw = dict(img_scale=(80, 30), min_size=0, mean=TRAIN_KW['mean'], std=TRAIN_KW['std'],
            pad_size=(64, 96), label_pad_size=(40, 64), scales=(0.5, 1.0, 1.75))
  for min_size in (0, 34):
    kw['min_size'] = min_size
    expected = tf_pipeline.eval_transform({'image': image, 'label': label, 'file_name': 'f'}, **kw)
    got = numpy_augment.eval_transform(image, label, **kw)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      assert got[key].dtype == value.dtype.as_numpy_dtype, key
      np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
  assert tuple(got['image_size']) == (34, 53)  # short side 34 >= 30: min_size rules
  with pytest.raises(UserError, match=r'example f2: .*config\.dataset\.eval_pad_size=\(32, 96\)'):
    numpy_augment.eval_transform(image, label, name='f2', **dict(kw, pad_size=(32, 96)))
  with pytest.raises(UserError, match=r'config\.dataset\.eval_label_pad_size=\(40, 40\)'):
    numpy_augment.eval_transform(image, label, **dict(kw, label_pad_size=(40, 40)))


# ---------------------------------------------------------------------------------------------
# The stream on the synthetic source.

NUM_TRAIN, NUM_VAL = 10, 7


def small_config(batch_size=4, seed=0, identity=False):
  """Synthetic 24 x 24 examples. `identity`: no resize, crop, flip or photometric step, so every
  output is its example normalised (and can be recognised)."""
  config = config_lib.get_base_config()
  config.seed = seed
  config.batch_size = batch_size
  config.mesh = 'data:1'
  d = config.dataset
  d.name = d.source = 'synthetic'
  d.num_classes = 5
  d.synthetic_image_size = 24
  d.synthetic_num_train = NUM_TRAIN
  d.synthetic_num_val = NUM_VAL
  d.crop_size = (16, 20)
  d.img_scale = (48, 24)
  d.shuffle_buffer = 100
  d.prefetch = 2
  d.test_img_scale = (40, 32)
  d.eval_pad_size = (32, 32)
  d.eval_label_pad_size = (24, 24)
  config.eval.batch_size = 4
  if identity:
    d.crop_size = d.img_scale = (24, 24)
    d.ratio_range = (1.0, 1.0)
    d.flip_prob = 0.0
    d.photometric = False
  return config


def take(config, n, process_index=0, process_count=1, start_step=0):
  batches = numpy_pipeline.create_train_dataset(
      config, process_index=process_index, process_count=process_count, start_step=start_step)
  out = list(itertools.islice(batches, n))
  batches.close()
  return out


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _identify(config, image_rows):
  """Train example ids of identity-transformed rows."""
  images, _ = synthetic.load(config.dataset, 'train')
  normalised = mmseg_rules.normalize(images.astype(np.float32), config.dataset.mean,
                                     config.dataset.std)
  matches = [[k for k in range(len(images)) if np.array_equal(row, normalised[k])]
             for row in image_rows]
  assert all(len(m) == 1 for m in matches)
  return [m[0] for m in matches]


def test_rows_are_the_transform_of_the_stream_rules():
  """Row r of host h at step s: train_transform(example order_e[p % N], uniforms(seed, p)),
  p = s * B + h * b + r, e = p // N."""
  config = small_config(batch_size=6, seed=3)
  host, hosts, b = 1, 3, 2
  batches = take(config, 4, host, hosts)  # 24 positions: crosses two epochs of 10
  images, labels = synthetic.load(config.dataset, 'train')
  kw = numpy_pipeline._train_kwargs(config.dataset)  # pylint: disable=protected-access
  for step, batch in enumerate(batches):
    assert batch['image'].shape == (b, 16, 20, 3) and batch['label'].shape == (b, 16, 20)
    for row, p in enumerate(numpy_pipeline.host_positions(step, 6, host, b)):
      assert p == step * 6 + host * b + row
      k = numpy_pipeline.epoch_order(3, p // NUM_TRAIN, NUM_TRAIN, True)[p % NUM_TRAIN]
      expected = numpy_augment.train_transform(
          images[k], labels[k], numpy_pipeline.example_uniforms(3, p), **kw)
      np.testing.assert_array_equal(batch['image'][row], expected['image'])
      np.testing.assert_array_equal(batch['label'][row], expected['label'])


def test_stream_is_deterministic_for_a_seed():
  a = take(small_config(), 4)
  assert_batches_equal(a, take(small_config(), 4))
  other = take(small_config(seed=1), 4)
  assert not any(np.array_equal(x['image'], y['image']) for x, y in zip(a, other))
  assert set(np.unique(np.concatenate([x['label'] for x in a]))) <= set(range(5)) | {255}


@pytest.mark.parametrize('process_count', [2, 3])
def test_hosts_together_yield_the_single_host_batches(process_count):
  config = small_config(batch_size=6)
  single = take(config, 4)
  hosts = [take(config, 4, h, process_count) for h in range(process_count)]
  joined = [{k: np.concatenate([hosts[h][s][k] for h in range(process_count)])
             for k in single[s]} for s in range(4)]
  assert_batches_equal(joined, single)


@pytest.mark.parametrize('process_index,process_count,start_steps', [(0, 1, (2, 3, 7)),
                                                                      (1, 2, (5,))])
def test_resume_equals_uninterrupted(process_index, process_count, start_steps):
  # 10 examples, global batch 4: resumed steps start inside epochs and across their boundaries.
  config = small_config(batch_size=4)
  full = take(config, 10, process_index, process_count)
  for s in start_steps:
    assert_batches_equal(take(config, 3, process_index, process_count, start_step=s),
                         full[s:s + 3])


def test_epochs_are_reshuffled_permutations():
  config = small_config(batch_size=5, identity=True)
  ids = _identify(config, np.concatenate([b['image'] for b in take(config, 6)]))
  epochs = [ids[i:i + NUM_TRAIN] for i in range(0, 30, NUM_TRAIN)]
  assert all(sorted(e) == list(range(NUM_TRAIN)) for e in epochs)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  config.dataset.shuffle_buffer = 1  # no shuffling: the split's order, every epoch
  assert _identify(config, np.concatenate([b['image'] for b in take(config, 4)])) == (
      list(range(NUM_TRAIN)) * 2)


def test_prefetch_thread_surfaces_exceptions_and_stops():
  def failing():
    yield 1
    yield 2
    raise ZeroDivisionError('in the producer')

  batches = numpy_pipeline.Prefetcher(failing(), 1)
  assert next(batches) == 1 and next(batches) == 2
  with pytest.raises(ZeroDivisionError, match='in the producer'):
    next(batches)
  with pytest.raises(StopIteration):
    next(batches)

  def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == 'numpy_pipeline-prefetch']

  before = len(prefetch_threads())
  endless = numpy_pipeline.Prefetcher(itertools.count(), 2)
  assert [next(endless) for _ in range(3)] == [0, 1, 2]
  assert len(prefetch_threads()) == before + 1
  endless.close()  # the thread was blocked on the full queue
  assert len(prefetch_threads()) == before
  with pytest.raises(StopIteration):
    next(endless)


def test_config_errors_raise_in_the_caller():
  with pytest.raises(UserError, match='config.batch_size=4'):
    numpy_pipeline.create_train_dataset(small_config(), process_index=0, process_count=3)
  config = small_config()
  config.dataset.synthetic_num_train = 0
  with pytest.raises(UserError, match='synthetic_num_train=0'):
    numpy_pipeline.create_train_dataset(config, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# Eval batches.


def test_eval_padding_validity_and_equal_batch_counts():
  config = small_config()
  hosts = 3  # shards of 3, 2, 2; host batch 2 (global 4 rounded up to 6 for 3 hosts)
  assert numpy_pipeline.eval_shard_sizes(config, hosts) == [3, 2, 2]
  images, labels = synthetic.load(config.dataset, 'validation')
  seen = []
  for host in range(hosts):
    batches = numpy_pipeline.create_eval_dataset(config, process_index=host,
                                                 process_count=hosts, batch_shards=hosts)
    assert len(batches) == len(list(batches)) == 2  # as many on every host, re-iterable
    for batch in batches:
      assert batch['image'].shape == (2, 32, 32, 3) and batch['label'].shape == (2, 24, 24)
      assert batch['scaled_size'].shape == (2, len(config.eval.scales), 2)
      assert batch['valid'].dtype == bool
      for row in range(2):
        if not batch['valid'][row]:
          assert not batch['image'][row].any() and np.all(batch['label'][row] == 255)
          assert not batch['image_size'][row].any() and not batch['label_size'][row].any()
          continue
        i = len(seen)  # hosts hold contiguous blocks, in host order
        seen.append(i)
        assert batch['image_size'][row].tolist() == [32, 32]  # 24 -> short side 32
        assert batch['label_size'][row].tolist() == [24, 24]
        np.testing.assert_array_equal(batch['label'][row], labels[i])
        expected = mmcv_reference.imnormalize(mmcv_reference.imresize_linear(images[i], 32, 32),
                                              config.dataset.mean, config.dataset.std)
        np.testing.assert_array_equal(batch['image'][row], expected)
  assert seen == list(range(NUM_VAL))  # contiguous host blocks, every example once


def test_eval_num_examples_limit():
  config = small_config()
  config.eval.num_examples = 4
  assert numpy_pipeline.eval_shard_sizes(config, 3) == [2, 2, 2]
  batches = list(numpy_pipeline.create_eval_dataset(config, process_index=2, process_count=3,
                                                    batch_shards=3))
  assert len(batches) == 1 and batches[0]['valid'].tolist() == [True, True]


# ---------------------------------------------------------------------------------------------
# No TensorFlow.

_WITHOUT_TENSORFLOW = """
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)

sys.meta_path.insert(0, NoTensorFlow())
import segvit_jax.data.numpy_pipeline
assert 'tensorflow' not in sys.modules
from segvit_jax import config as config_lib
from segvit_jax.data import input_pipeline
config = config_lib.get_base_config()
config.batch_size, config.mesh = 4, 'data:1'
d = config.dataset
d.name = d.source = 'synthetic'
d.num_classes, d.synthetic_image_size, d.synthetic_num_train, d.synthetic_num_val = 5, 24, 6, 3
d.crop_size, d.img_scale, d.test_img_scale = (16, 20), (48, 24), (40, 32)
d.eval_pad_size, d.eval_label_pad_size = (32, 32), (24, 24)
batches = input_pipeline.create_train_dataset(config, process_index=0, process_count=1)
assert next(batches)['image'].shape == (4, 16, 20, 3)
assert len(list(input_pipeline.create_eval_dataset(config, process_index=0, process_count=1)))
print('no tensorflow:', 'tensorflow' not in sys.modules)
"""


def test_runs_without_tensorflow(subprocess_env, repo_root):
  proc = subprocess.run([sys.executable, '-c', _WITHOUT_TENSORFLOW], cwd=repo_root,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'no tensorflow: True' in proc.stdout
