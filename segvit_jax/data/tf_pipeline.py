"""The tf.data pipelines of file sources (TFDS builds, mmseg folders): the stream rules of
`segvit_jax.data.input_pipeline` (read its docstring for the batch layouts and the determinism), with
mmseg's transforms as TensorFlow graph ops (`augment`).

Every host reads (not decodes) every training record; sources yield encoded image / label bytes
where they can, decoded only after the shuffle, the skip and the host's selection
(`decode_example`), so the shuffle buffer holds encoded examples and resuming is cheap.

With `augment` and the file sources (`sources.tfds_builder`, `sources.mmseg_folder`,
`sources.reader`), the only modules that import TensorFlow.
"""

import math
from typing import Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from segvit_jax.data import augment
from segvit_jax.data import input_pipeline
from segvit_jax.data import mmseg_rules
from segvit_jax.data.input_pipeline import EVAL_SPLIT, TRAIN_SPLIT

# source_fn(dataset_config, split, *, shard_index, num_shards) -> tf.data.Dataset of
# {'image': uint8 (H, W, 3), 'label': uint8 (H, W), 'file_name': string}.
SourceFn = Callable[..., tf.data.Dataset]


def _default_source_fn() -> SourceFn:
  from segvit_jax.data.sources import reader  # pylint: disable=g-import-not-at-top
  return reader.get_source


def _num_examples(source: tf.data.Dataset, what: str) -> int:
  """The number of examples of a finite source (counting them only if tf.data does not know)."""
  n = int(source.cardinality())
  if n == tf.data.INFINITE_CARDINALITY:
    raise ValueError(f'The {what} source is infinite; sources must yield each example once.')
  if n < 0:  # unknown: count (reads the whole shard once)
    n = int(source.reduce(np.int64(0), lambda count, _: count + 1))
  if n == 0:
    raise ValueError(f'The {what} source is empty.')
  return n


def decode_example(example: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
  """(image (H, W, 3) uint8, label (H, W) uint8) of a source example.

  A source may also yield encoded bytes (tf.string: JPEG / PNG image, single-channel PNG label
  already in train ids): they are decoded here, after shuffling and skipping, which keeps the
  shuffle buffer small and makes resuming cheap, by mmseg's decoders (`augment.decode_image` /
  `decode_label`: the pixels OpenCV's IMREAD_COLOR gives, as in prediction).
  """
  image, label = example['image'], example['label']
  if image.dtype == tf.string:
    image = augment.decode_image(image)
  if label.dtype == tf.string:
    label = augment.decode_label(label)
  return image, label


def _keep_tensorflow_off_accelerators() -> None:
  """tf.data runs on the host: without this, TensorFlow would claim GPU memory JAX needs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow's devices were initialised already (a second pipeline)
    pass


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1  # parallelism comes from the parallel map
  return options


def _epoch_seed(seed: int, epoch):
  """int64 shuffle seed of one epoch, distinct for every (seed, epoch) with epoch < 2**32."""
  return tf.constant((seed % 2**31) * 2**32, tf.int64) + tf.cast(epoch, tf.int64)


# ---------------------------------------------------------------------------------------------
# Train.


def create_train_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                         process_count: int, start_step: int = 0,
                         source_fn: Optional[SourceFn] = None) -> tf.data.Dataset:
  """Infinite dataset of this host's training batches from global step `start_step` on.

  Args:
    config: the experiment config (uses seed, batch_size and dataset.*).
    process_index, process_count: this host and the number of hosts (jax.process_index/count()).
    start_step: the global step of the first batch (resuming from a checkpoint).
    source_fn: replaces `segvit_jax.data.sources.reader.get_source` (tests, benchmarks).
  """
  _keep_tensorflow_off_accelerators()
  d = config.dataset
  global_batch = int(config.batch_size)
  local_batch = input_pipeline.host_batch_size(global_batch, process_count, 'config.batch_size')
  source_fn = source_fn or _default_source_fn()
  source = source_fn(d, TRAIN_SPLIT, shard_index=0, num_shards=1)  # all of it, on every host
  source = source.map(tf.autograph.experimental.do_not_convert(
      lambda ex: {'image': ex['image'], 'label': ex['label']}))
  num_examples = _num_examples(source, f'{d.name} {TRAIN_SPLIT}')

  first_position = int(start_step) * global_batch  # in the global stream
  first_epoch, skip = divmod(first_position, num_examples)
  seed = int(config.seed)

  def epoch(e):
    if d.shuffle_buffer > 1:
      return source.shuffle(d.shuffle_buffer, seed=_epoch_seed(seed, e),
                            reshuffle_each_iteration=False)
    return source

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  ds = ds.skip(skip).enumerate(start=first_position)
  if process_count > 1:
    mine = tf.autograph.experimental.do_not_convert(
        lambda position, _: (position % global_batch) // local_batch == process_index)
    ds = ds.filter(mine)

  crop_size = tuple(d.crop_size)
  kwargs = dict(crop_size=crop_size, img_scale=tuple(d.img_scale),
                ratio_range=tuple(d.ratio_range), cat_max_ratio=float(d.cat_max_ratio),
                flip_prob=float(d.flip_prob), photometric=bool(d.photometric),
                mean=tuple(d.mean), std=tuple(d.std))

  @tf.autograph.experimental.do_not_convert  # plain tf ops: skipping autograph halves tracing
  def transform(position, example):
    seed_pair = tf.stack([tf.constant(seed, tf.int64), position])
    image, label = decode_example(example)
    return augment.train_transform(image, label, seed_pair, **kwargs)

  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(max(int(d.prefetch), 1))
  return ds.with_options(_options())


# ---------------------------------------------------------------------------------------------
# Eval.


def eval_transform(example: Mapping[str, tf.Tensor], *, img_scale: Sequence[int], min_size: int,
                   mean: Sequence[float], std: Sequence[float], pad_size: Sequence[int],
                   label_pad_size: Sequence[int],
                   scales: Sequence[float] = (1.0,)) -> dict[str, tf.Tensor]:
  """The test transform of one example, padded to the static buckets.

  `scales` are the test-time ratios (`config.eval.scales`): 'scaled_size' holds the image's
  test-resized (h, w) at each of them (mmseg's MultiScaleFlipAug + Resize, `mmseg_rules`'
  float64 arithmetic), for multi-scale evaluation.

  Fails (tf.errors.InvalidArgumentError when iterated) naming the file and the config key when the
  resized image or the original label does not fit its bucket: never crops silently.
  """
  image, label = decode_example(example)
  name = example['file_name']
  resized, new_hw = augment.eval_resize(image, img_scale, min_size)
  label_hw = tf.shape(label)[:2]
  image_hw = tf.shape(image)[:2]
  scaled = [augment.resized_size(image_hw, mmseg_rules.ratio_scale(img_scale, float(r)), min_size)
            for r in scales]
  checks = [
      tf.debugging.Assert(
          tf.reduce_all(new_hw <= tf.constant(pad_size, tf.int32)),
          [f'Eval image too large for config.dataset.eval_pad_size={tuple(pad_size)}; raise '
           'that bucket. File:', name, 'resized (h, w):', new_hw]),
      tf.debugging.Assert(
          tf.reduce_all(label_hw <= tf.constant(label_pad_size, tf.int32)),
          [f'Eval label too large for config.dataset.eval_label_pad_size={tuple(label_pad_size)}; '
           'raise that bucket. File:', name, '(h, w):', label_hw]),
  ]
  with tf.control_dependencies(checks):
    image = mmseg_rules.normalize(resized, mean, std, xp=tf)
    label = tf.cast(label, tf.int32)
  return {
      'image': augment.pad_bottom_right(image, pad_size, 0.0),
      'image_size': new_hw,
      'scaled_size': tf.reshape(tf.stack(scaled), [len(scales), 2]),
      'label': augment.pad_bottom_right(label, label_pad_size, mmseg_rules.IGNORE_LABEL),
      'label_size': tf.cast(label_hw, tf.int32),
      'valid': tf.constant(True),
  }


def _padding_example(pad_size, label_pad_size, num_scales: int) -> dict[str, tf.Tensor]:
  return {
      'image': tf.zeros(list(pad_size) + [3], tf.float32),
      'image_size': tf.zeros([2], tf.int32),
      'scaled_size': tf.zeros([num_scales, 2], tf.int32),
      'label': tf.fill(list(label_pad_size), tf.constant(mmseg_rules.IGNORE_LABEL, tf.int32)),
      'label_size': tf.zeros([2], tf.int32),
      'valid': tf.constant(False),
  }


def eval_shard_sizes(config: ml_collections.ConfigDict, process_count: int,
                     source_fn: Optional[SourceFn] = None) -> list[int]:
  """Examples each host evaluates (after config.eval.num_examples), host 0 first."""
  source_fn = source_fn or _default_source_fn()
  d = config.dataset
  sizes = [_num_examples(source_fn(d, EVAL_SPLIT, shard_index=i, num_shards=process_count),
                         f'{d.name} {EVAL_SPLIT} shard {i}') for i in range(process_count)]
  return input_pipeline.limit_eval_shards(sizes, config)


def create_eval_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                        process_count: int, batch_shards: Optional[int] = None,
                        source_fn: Optional[SourceFn] = None) -> tf.data.Dataset:
  """Finite dataset of this host's eval batches; the same number of batches on every host.

  `batch_shards`: data x fsdp of the mesh the batches go to (default: config.mesh over all
  devices); the global batch is `eval_batch_size(config, process_count, batch_shards)`.
  """
  _keep_tensorflow_off_accelerators()
  d = config.dataset
  global_batch = input_pipeline.eval_batch_size(config, process_count, batch_shards)
  local_batch = input_pipeline.host_batch_size(global_batch, process_count,
                                               'config.eval.batch_size')
  pad_size, label_pad_size = input_pipeline.eval_pad_sizes(config)
  source_fn = source_fn or _default_source_fn()
  sizes = eval_shard_sizes(config, process_count, source_fn)
  num_batches = math.ceil(max(sizes) / local_batch)
  mine = sizes[process_index]

  source = source_fn(d, EVAL_SPLIT, shard_index=process_index, num_shards=process_count)
  scales = tuple(float(r) for r in config.eval.scales)
  kwargs = dict(img_scale=tuple(d.test_img_scale), min_size=int(d.test_min_size),
                mean=tuple(d.mean), std=tuple(d.std), pad_size=pad_size,
                label_pad_size=label_pad_size, scales=scales)
  transform = tf.autograph.experimental.do_not_convert(lambda ex: eval_transform(ex, **kwargs))
  ds = source.take(mine).map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.range(num_batches * local_batch - mine).map(
      tf.autograph.experimental.do_not_convert(
          lambda _: _padding_example(pad_size, label_pad_size, len(scales))))
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
  ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
  ds = ds.prefetch(max(int(d.prefetch), 1))
  return ds.with_options(_options())
