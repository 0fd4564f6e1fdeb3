"""input_pipeline.py: shapes, determinism, resume, host shards, eval padding, global arrays.

A small in-memory source stands in for `segvit_jax.data.sources.reader.get_source`: example i has a
constant image of value 10 + 15 i (so it can be recognised after resize / crop / normalisation
with the photometric step off) and a blocky label; hosts read contiguous near-equal blocks, like
the dataset sources do.
"""

import itertools
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorflow as tf

import mmcv_reference
from segvit_jax.data import augment
from segvit_jax import config as config_lib
from segvit_jax import sharding
from segvit_jax.data import input_pipeline

NUM = 12
NUM_CLASSES = 5


def _example(i):
  rng = np.random.default_rng(100 + i)
  h, w = 20 + (7 * i) % 19, 26 + (11 * i) % 23
  image = np.full((h, w, 3), 10 + 15 * i, np.uint8)
  small = rng.integers(0, NUM_CLASSES, (-(-h // 5), -(-w // 5)))
  small[rng.random(small.shape) < 0.1] = 255
  label = np.kron(small, np.ones((5, 5), np.int64))[:h, :w].astype(np.uint8)
  return image, label


def _identify(image_rows):
  """Example ids from normalised constant images (mean = std = 127.5): value 10 + 15 i."""
  values = np.round(image_rows[:, 0, 0, 0] * 127.5 + 127.5)
  return ((values - 10) / 15).astype(int).tolist()


def make_source_fn(num=NUM):
  """source_fn(dataset_config, split, *, shard_index, num_shards) over `num` examples."""
  examples = [_example(i) for i in range(num)]
  hmax = max(e[0].shape[0] for e in examples)
  wmax = max(e[0].shape[1] for e in examples)
  images = np.zeros((num, hmax, wmax, 3), np.uint8)
  labels = np.zeros((num, hmax, wmax), np.uint8)
  sizes = np.zeros((num, 2), np.int32)
  for i, (image, label) in enumerate(examples):
    h, w = label.shape
    images[i, :h, :w], labels[i, :h, :w], sizes[i] = image, label, (h, w)
  names = [f'file_{i:03d}.jpg' for i in range(num)]

  def source_fn(dataset_config, split, *, shard_index=0, num_shards=1):
    del dataset_config, split
    base, extra = divmod(num, num_shards)
    start = shard_index * base + min(shard_index, extra)
    count = base + (shard_index < extra)
    ds = tf.data.Dataset.from_tensor_slices((images, labels, sizes, names))
    ds = ds.skip(start).take(count)
    return ds.map(lambda i, lbl, s, n: {'image': i[:s[0], :s[1]], 'label': lbl[:s[0], :s[1]],
                                      'file_name': n})

  return source_fn


def small_config(batch_size=4, seed=0, photometric=False):
  config = config_lib.get_base_config()
  config.seed = seed
  config.batch_size = batch_size
  d = config.dataset
  d.crop_size = (16, 20)
  d.img_scale = (48, 24)
  d.photometric = photometric
  d.shuffle_buffer = 8
  d.prefetch = 1
  d.test_img_scale = (64, 32)
  d.eval_pad_size = (96, 96)
  d.eval_label_pad_size = (48, 64)
  config.eval.batch_size = 6
  return config


def take(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def train(config, process_index=0, process_count=1, start_step=0, num=NUM):
  return input_pipeline.create_train_dataset(config, process_index=process_index,
                                             process_count=process_count, start_step=start_step,
                                             source_fn=make_source_fn(num))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Train.


def test_train_static_shapes_and_values():
  ds = train(small_config(photometric=True))
  spec = ds.element_spec
  assert spec['image'].shape == (4, 16, 20, 3) and spec['image'].dtype == tf.float32
  assert spec['label'].shape == (4, 16, 20) and spec['label'].dtype == tf.int32
  for batch in take(ds, 4):
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert set(np.unique(batch['label'])) <= set(range(NUM_CLASSES)) | {255}


def test_train_deterministic_for_a_seed():
  config = small_config(photometric=True)
  a = take(train(config), 5)
  assert_batches_equal(a, take(train(config), 5))
  other = take(train(small_config(seed=1, photometric=True)), 5)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, other))


@pytest.mark.parametrize('process_index,process_count,start_steps', [(0, 1, (2, 3, 7)),
                                                                      (1, 2, (5,))])
def test_resume_equals_uninterrupted(process_index, process_count, start_steps):
  # 12 examples, global batch 4 (3 steps per epoch; host batch 2 on 2 hosts): the resumed steps
  # cross epoch boundaries (whole epochs skipped arithmetically, the rest inside the epoch).
  config = small_config(batch_size=4, photometric=True)
  full = take(train(config, process_index, process_count), 10)
  for s in start_steps:
    resumed = take(train(config, process_index, process_count, start_step=s), 3)
    assert_batches_equal(resumed, full[s:s + 3])


@pytest.mark.parametrize('process_count', [2, 3])
def test_hosts_together_yield_the_single_host_batches(process_count):
  """Global batches do not depend on the number of hosts (the multi-host equality rests on it)."""
  config = small_config(batch_size=6, photometric=True)  # 12 examples: 2 epochs in 4 steps
  single = take(train(config, 0, 1), 4)
  hosts = [take(train(config, h, process_count), 4) for h in range(process_count)]
  joined = [{k: np.concatenate([hosts[h][s][k] for h in range(process_count)])
             for k in single[s]} for s in range(4)]
  assert_batches_equal(joined, single)
  ids = _identify(np.concatenate([b['image'] for b in take(train(small_config(batch_size=6)), 2)]))
  assert sorted(ids) == list(range(NUM))  # the stream is the whole split, each example once


def test_epochs_are_reshuffled():
  ids = _identify(np.concatenate([b['image'] for b in take(train(small_config()), 6)]))
  assert sorted(ids[:NUM]) == sorted(ids[NUM:]) == list(range(NUM))
  assert ids[:NUM] != ids[NUM:]


def test_augmentation_keyed_on_seed_and_global_position():
  """Row r of host h at step s is augment(example, seed=(config.seed, s * B + h * b + r))."""
  config = small_config(batch_size=6, seed=3, photometric=True)
  host, b = 2, 2
  batches = take(train(config, host, 3), 3)
  examples = [_example(i) for i in range(NUM)]
  d = config.dataset
  kw = dict(crop_size=d.crop_size, img_scale=d.img_scale, ratio_range=d.ratio_range,
            cat_max_ratio=d.cat_max_ratio, flip_prob=d.flip_prob, photometric=True, mean=d.mean,
            std=d.std)
  # Identify the examples from a photometric-free run with the same shuffle.
  plain = take(train(small_config(batch_size=6, seed=3), host, 3), 3)
  for step in range(3):
    ids = _identify(plain[step]['image'])
    for row in range(b):
      image, label = examples[ids[row]]
      expected = augment.train_transform(image, label, [3, step * 6 + host * b + row], **kw)
      np.testing.assert_array_equal(batches[step]['image'][row], expected['image'])
      np.testing.assert_array_equal(batches[step]['label'][row], expected['label'])


def test_encoded_source_is_decoded_after_shuffling():
  """A source of PNG bytes gives the same batches as the decoded source."""
  decoded_fn = make_source_fn()

  def encoded_fn(dataset_config, split, *, shard_index=0, num_shards=1):
    return decoded_fn(dataset_config, split, shard_index=shard_index, num_shards=num_shards).map(
        lambda ex: {'image': tf.io.encode_png(ex['image']),
                    'label': tf.io.encode_png(ex['label'][..., None]),
                    'file_name': ex['file_name']})

  config = small_config(photometric=True)
  expected = take(train(config), 4)
  got = take(input_pipeline.create_train_dataset(config, process_index=0, process_count=1,
                                                 source_fn=encoded_fn), 4)
  assert_batches_equal(got, expected)
  eval_expected = list(input_pipeline.create_eval_dataset(
      config, process_index=0, process_count=1, source_fn=decoded_fn).as_numpy_iterator())
  eval_got = list(input_pipeline.create_eval_dataset(
      config, process_index=0, process_count=1, source_fn=encoded_fn).as_numpy_iterator())
  assert_batches_equal(eval_got, eval_expected)


def test_batch_size_must_divide():
  with pytest.raises(ValueError, match='config.batch_size=4'):
    train(small_config(batch_size=4), 0, 3)


# ---------------------------------------------------------------------------------------------
# Eval.


def _eval(config, host, hosts, num=11):
  # One batch shard per host: the host-level batching alone (the shard rounding has its test).
  return input_pipeline.create_eval_dataset(config, process_index=host, process_count=hosts,
                                            batch_shards=hosts, source_fn=make_source_fn(num))


def test_eval_padding_validity_and_equal_batch_counts():
  config = small_config()
  num, hosts = 11, 3  # shards of 4, 4, 3; host batch 2
  valid_ids, counts = [], []
  for host in range(hosts):
    ds = _eval(config, host, hosts, num)
    spec = ds.element_spec
    assert spec['image'].shape == (2, 96, 96, 3) and spec['label'].shape == (2, 48, 64)
    assert spec['image_size'].shape == spec['label_size'].shape == (2, 2)
    assert spec['scaled_size'].shape == (2, len(config.eval.scales), 2)
    assert spec['valid'].shape == (2,) and spec['valid'].dtype == tf.bool
    batches = list(ds.as_numpy_iterator())
    counts.append(len(batches))
    assert len(ds) == len(batches)
    for batch in batches:
      for row in range(2):
        image, label = batch['image'][row], batch['label'][row]
        if not batch['valid'][row]:
          assert np.all(image == 0) and np.all(label == 255)
          assert batch['image_size'][row].tolist() == batch['label_size'][row].tolist() == [0, 0]
          assert not batch['scaled_size'][row].any()
          continue
        i = _identify(image[None])[0]
        valid_ids.append(i)
        src_image, src_label = _example(i)
        h, w = src_label.shape
        assert batch['label_size'][row].tolist() == [h, w]
        np.testing.assert_array_equal(label[:h, :w], src_label)  # original resolution
        assert np.all(label[h:] == 255) and np.all(label[:, w:] == 255)
        nh, nw = batch['image_size'][row]
        assert (nh, nw) == mmcv_reference.rescale_size(h, w, (64, 32))
        # The size at every test ratio, from the original size (mmseg's MultiScaleFlipAug).
        assert batch['scaled_size'][row].tolist() == [
            list(mmcv_reference.rescale_size(h, w, mmcv_reference.ratio_scale((64, 32), r)))
            for r in config.eval.scales]
        np.testing.assert_allclose(image[:nh, :nw], (src_image[0, 0, 0] - 127.5) / 127.5,
                                   atol=1e-6)
        assert np.all(image[nh:] == 0) and np.all(image[:, nw:] == 0)
  assert counts == [2, 2, 2]  # every host runs the same number of eval steps
  assert sorted(valid_ids) == list(range(num))


def test_eval_num_examples_limit():
  config = small_config()
  config.eval.num_examples = 5
  assert input_pipeline.eval_shard_sizes(config, 3, make_source_fn(11)) == [2, 2, 2]
  batches = list(_eval(config, 2, 3).as_numpy_iterator())
  assert len(batches) == 1 and batches[0]['valid'].tolist() == [True, True]


def test_eval_batch_is_rounded_up_to_the_batch_shards():
  # config.eval.batch_size=5 on data x fsdp = 4 shards and 2 hosts: global batches of 8, 4 rows
  # per host; every example once, the rest padding rows with valid=False.
  config = small_config()
  config.eval.batch_size = 5
  assert input_pipeline.eval_batch_size(config, 2, batch_shards=4) == 8
  assert input_pipeline.eval_batch_size(config, 1, batch_shards=1) == 5
  # Default: config.mesh over all devices (8 here: data=-1 takes them all).
  assert input_pipeline.eval_batch_size(config, 1) == 8
  ids, counts = [], []
  for host in range(2):
    ds = input_pipeline.create_eval_dataset(config, process_index=host, process_count=2,
                                            batch_shards=4, source_fn=make_source_fn(11))
    batches = list(ds.as_numpy_iterator())
    counts.append(len(batches))
    for batch in batches:
      assert batch['image'].shape[0] == batch['valid'].shape[0] == 4
      ids += _identify(batch['image'][batch['valid']])
  assert counts == [2, 2]  # hosts hold 6 and 5 examples
  assert sorted(ids) == list(range(11))


def test_eval_too_large_fails_naming_the_file():
  config = small_config()
  config.dataset.eval_label_pad_size = (32, 64)  # example 2 is 34 px high
  with pytest.raises(tf.errors.InvalidArgumentError, match='eval_label_pad_size') as info:
    list(_eval(config, 0, 1).as_numpy_iterator())
  assert 'file_002.jpg' in str(info.value)
  config = small_config()
  config.dataset.eval_pad_size = (32, 96)
  with pytest.raises(tf.errors.InvalidArgumentError, match='eval_pad_size'):
    list(_eval(config, 0, 1).as_numpy_iterator())


# ---------------------------------------------------------------------------------------------
# Global arrays on the test process's 8 simulated CPU devices (tests/conftest.py).


def test_global_batch_on_simulated_devices():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ('data', 'fsdp', 'model'))
  host = {'image': np.arange(8 * 4 * 4 * 3, dtype=np.float32).reshape(8, 4, 4, 3),
          'label': np.arange(8 * 16, dtype=np.int32).reshape(8, 4, 4),
          'valid': np.array([True] * 7 + [False]), 'file_name': np.array([b'a'] * 8)}
  out = input_pipeline.make_global_batch(host, mesh)
  assert sorted(out) == ['image', 'label', 'valid'], sorted(out)
  for key, value in out.items():
    assert isinstance(value, jax.Array) and value.shape == host[key].shape
    assert value.sharding.spec == P(('data', 'fsdp')), value.sharding.spec
    np.testing.assert_array_equal(np.asarray(value), host[key])
    shards = value.addressable_shards
    assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
    for s in shards:  # device (i, j) of the (data, fsdp) grid holds batch row 2 i + j
      np.testing.assert_array_equal(np.asarray(s.data), host[key][s.index])
  # A mesh without 'fsdp': the batch is split over 'data' only.
  mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ('data', 'model'))
  assert sharding.batch_sharding(mesh2).spec == P(('data',))
  ds = tf.data.Dataset.range(3).map(lambda i: {'x': tf.fill([8, 2], tf.cast(i, tf.float32))})
  got = [np.asarray(b['x'])[:, 0].tolist() for b in input_pipeline.global_batches(ds, mesh)]
  assert got == [[float(i)] * 8 for i in range(3)], got


# ---------------------------------------------------------------------------------------------
# With the real sources: a TFDS build through tf.data (`segvit_jax.data.sources.reader.get_source`),
# the synthetic source through numpy_pipeline (no files, no TensorFlow needed).


def test_with_a_tfds_build(tmp_path):
  """The TFDS source (sharded even splits, decoding in the graph) through both pipelines."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Imported for its side effect: it registers the TFDS builder 'ade20k' used below.
  from segvit_jax.data.sources import tfds_builder  # noqa: F401  # pylint: disable=unused-import
  try:
    from tests import official_layouts as layouts  # pylint: disable=g-import-not-at-top
  except ImportError:
    import official_layouts as layouts  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  raw = np.tile(np.arange(16)[None] % 5 + 1, (12, 1)).astype(np.uint8)  # ADE ids 1..5
  pairs = [(f'ADE_train_{i:08d}', layouts.random_image(rng, 12, 16), raw) for i in range(1, 8)]
  (tmp_path / 'manual').mkdir()
  layouts.ade20k_zip(str(tmp_path / 'manual'), pairs, pairs[:3])
  tfds.builder('ade20k', data_dir=str(tmp_path / 'data')).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
  config = small_config(batch_size=4)
  d = config.dataset
  d.data_dir = str(tmp_path / 'data')
  d.crop_size, d.img_scale, d.test_img_scale = (8, 8), (32, 12), (32, 12)
  d.eval_pad_size, d.eval_label_pad_size = (32, 32), (16, 16)
  config.eval.batch_size = 2
  for host in range(2):
    full = take(input_pipeline.create_train_dataset(config, process_index=host, process_count=2),
                6)
    resumed = take(input_pipeline.create_train_dataset(
        config, process_index=host, process_count=2, start_step=4), 2)
    assert_batches_equal(resumed, full[4:])
    assert set(np.unique(full[0]['label'])) <= {0, 1, 2, 3, 4, 255}
  valid = [b['valid'].tolist() for host in range(2) for b in input_pipeline.create_eval_dataset(
      config, process_index=host, process_count=2, batch_shards=2).as_numpy_iterator()]
  assert valid == [[True], [True], [True], [False]]  # shards of 2 and 1: 2 batches each


def test_with_the_synthetic_source():
  """Source 'synthetic' is read by numpy_pipeline (numpy batches, no tf.data), by the same rules:
  hosts together yield the single-host batches, a resumed stream the uninterrupted one, every
  host the same number of eval batches with padding rows marked invalid."""
  config = small_config(batch_size=4, photometric=True)
  d = config.dataset
  d.name = d.source = 'synthetic'
  d.num_classes = 5
  d.reduce_zero_label = False
  d.synthetic_image_size = 40
  d.synthetic_num_train = 10
  d.synthetic_num_val = 5
  d.test_img_scale = (64, 48)
  d.eval_pad_size = (48, 48)
  d.eval_label_pad_size = (40, 40)
  config.eval.batch_size = 4

  def batches(host, hosts, n, start_step=0):
    stream = input_pipeline.create_train_dataset(config, process_index=host, process_count=hosts,
                                                 start_step=start_step)
    return list(itertools.islice(stream, n))

  single = batches(0, 1, 5)  # 20 positions: two epochs of 10
  assert isinstance(single[0]['image'], np.ndarray)
  assert single[0]['image'].shape == (4, 16, 20, 3) and single[0]['label'].shape == (4, 16, 20)
  assert set(np.unique(np.concatenate([b['label'] for b in single]))) <= set(range(5)) | {255}
  hosts = [batches(h, 2, 5) for h in range(2)]
  assert_batches_equal([{k: np.concatenate([hosts[0][s][k], hosts[1][s][k]]) for k in single[s]}
                        for s in range(5)], single)
  assert_batches_equal(batches(1, 2, 2, start_step=3), hosts[1][3:])
  # Numpy host batches become global arrays as tf.data ones do.
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(4, 1, 1), ('data', 'fsdp', 'model'))
  stream = input_pipeline.create_train_dataset(config, process_index=0, process_count=1)
  first = next(input_pipeline.global_batches(stream, mesh))
  np.testing.assert_array_equal(np.asarray(first['image']), single[0]['image'])

  assert input_pipeline.eval_shard_sizes(config, 2) == [3, 2]
  valid = []
  for host in range(2):
    eval_batches = list(input_pipeline.create_eval_dataset(
        config, process_index=host, process_count=2, batch_shards=2))
    assert len(eval_batches) == 2  # shards of 3 and 2, host batch 2
    for b in eval_batches:
      valid += b['valid'].tolist()
      assert b['image'].shape == (2, 48, 48, 3) and b['label'].shape == (2, 40, 40)
      assert np.all(b['image_size'][b['valid']] == 48)
      assert np.all(b['label'][~b['valid']] == 255) and not b['image'][~b['valid']].any()
  assert valid == [True, True, True, False, True, True, False, False]
