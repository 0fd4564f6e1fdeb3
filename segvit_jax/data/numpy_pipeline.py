"""The input pipeline of in-memory sources (a dataset declared with `in_memory`, e.g.
'synthetic'), in numpy: no TensorFlow, so the demo, the benchmarks and GPU machines run without it.

Batches have the layouts and the stream rules of `input_pipeline`'s docstring, as `tf_pipeline`
yields them:
- Train: {'image': (b, Ch, Cw, 3) float32 normalised, NHWC, 0 in the padding; 'label':
  (b, Ch, Cw) int32, 255 = ignore / padding}, b = config.batch_size // process_count. The global
  stream chains epochs of the whole split; example p of it belongs to step p // batch_size and
  host h keeps rows [h * b, (h + 1) * b) of each global batch. With dataset.shuffle_buffer > 1,
  epoch e is a full permutation of the split drawn by a numpy generator keyed on (config.seed, e)
  (`epoch_order`): the data is in memory, so no buffer bounds the shuffle. Example p is augmented
  with the uniforms of a numpy generator keyed on (config.seed, p) (`example_uniforms`). So a
  resumed run (`start_step`) computes its first position and goes on, transforming nothing it
  skips, and the batches do not depend on the number of hosts. The order and the draws are
  numpy's, not tf.data's: the two pipelines yield different (equally distributed) streams.
- Eval: test-resized, normalised images 0-padded to dataset.eval_pad_size, labels at the original
  size 255-padded to dataset.eval_label_pad_size, with their sizes and a `valid` flag; each host
  evaluates its contiguous block of the split (`sources.even_range`) and pads its last
  batches with valid=False rows, so that every host yields the same number of batches.

Examples are transformed by `numpy_augment` (mmseg's transforms, bit for bit as `augment`'s).
A daemon thread transforms the next dataset.prefetch train batches while the device runs a step
(`Prefetcher`).
"""

import collections.abc
import itertools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import ml_collections
import numpy as np

from segvit_jax.data import datasets
from segvit_jax.data import input_pipeline
from segvit_jax.data import numpy_augment
from segvit_jax.data.input_pipeline import EVAL_SPLIT, TRAIN_SPLIT
from segvit_jax.data.mmseg_rules import IGNORE_LABEL, NUM_UNIFORMS
from segvit_jax.data.sources import even_range
from segvit_jax.errors import UserError

_POLL_S = 0.1  # how often a prefetch thread blocked on a full queue checks for close()
# The keys of the numpy generators drawn from config.seed: the shuffle and the augmentation read
# separate streams, so epoch e's order is independent of the draws at stream position e.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def in_memory_names() -> list[str]:
  """The sources this pipeline reads: the datasets declared with an in-memory source."""
  return sorted(d.name for d in datasets.all_datasets() if d.in_memory is not None)


def _source(dataset_config: ml_collections.ConfigDict) -> datasets.InMemorySource:
  source = dataset_config.source
  dataset = datasets.find(source)
  if dataset is None or dataset.in_memory is None:
    raise UserError(f'config.dataset.source={source!r} is not an in-memory source; the numpy '
                    f'pipeline reads {in_memory_names()}.')
  return dataset.in_memory


def num_examples(dataset_config: ml_collections.ConfigDict, split: str) -> int:
  """Examples of `split` over all hosts; a UserError when the split is empty."""
  source = _source(dataset_config)
  n = int(source.num_examples(dataset_config, split))
  if n <= 0:
    key = source.split_size_keys.get(split)
    hint = f' (config.dataset.{key}={n})' if key else ''
    raise UserError(f'The {split} split of config.dataset.source={dataset_config.source!r} is '
                    f'empty{hint}; it needs at least one example.')
  return n


def load_split(dataset_config: ml_collections.ConfigDict, split: str):
  """(images, labels) of `split`: images[i] (H, W, 3) uint8 RGB, labels[i] (H, W) uint8."""
  num_examples(dataset_config, split)
  return _source(dataset_config).load(dataset_config, split)


# ---------------------------------------------------------------------------------------------
# The stream: which example at which position, with which random numbers.


def _seed_key(seed: int) -> int:
  return int(seed) % 2**64  # numpy seeds are non-negative; negative config seeds wrap


def epoch_order(seed: int, epoch: int, num: int, shuffle: bool) -> np.ndarray:
  """(num,) int64: the example at each place of epoch `epoch` of the global stream.

  A permutation keyed on (seed, epoch) when shuffling, else 0..num-1.
  """
  if not shuffle:
    return np.arange(num)
  rng = np.random.default_rng([_SHUFFLE_STREAM, _seed_key(seed), int(epoch)])
  return rng.permutation(num)


def example_uniforms(seed: int, position: int) -> np.ndarray:
  """(NUM_UNIFORMS,) float64 in [0, 1): every random number of the example at global stream
  position `position`, in `mmseg_rules`' slot layout, keyed on (seed, position)."""
  rng = np.random.default_rng([_AUGMENT_STREAM, _seed_key(seed), int(position)])
  return rng.random(NUM_UNIFORMS)


def host_positions(step: int, global_batch: int, process_index: int,
                   local_batch: int) -> range:
  """Global stream positions of this host's rows of global step `step`."""
  first = step * global_batch + process_index * local_batch
  return range(first, first + local_batch)


def _train_kwargs(d: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(crop_size=tuple(int(s) for s in d.crop_size),
              img_scale=tuple(d.img_scale), ratio_range=tuple(d.ratio_range),
              cat_max_ratio=float(d.cat_max_ratio), flip_prob=float(d.flip_prob),
              photometric=bool(d.photometric), mean=tuple(d.mean), std=tuple(d.std))


# ---------------------------------------------------------------------------------------------
# Train stream.


class Prefetcher:
  """Iterates `batches` in a daemon thread, up to `size` items ahead of the consumer.

  An exception raised by `batches` is raised again by `next()` in the consumer. `close()` (or
  garbage collection) stops the thread within a fraction of a second; the bounded queue keeps
  it from running ahead.
  """

  def __init__(self, batches: Iterable[Any], size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(int(size), 1))
    self._stop = threading.Event()
    self._finished = False
    # The thread holds the queue and the event, not `self`: a dropped iterator is collected.
    self._thread = threading.Thread(target=_produce, args=(iter(batches), self._queue, self._stop),
                                    name='numpy_pipeline-prefetch', daemon=True)
    self._thread.start()

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Any:
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _End):
      self._finished = True
      if item.error is not None:
        raise item.error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the thread (a batch being transformed is finished first, then dropped)."""
    self._finished = True
    self._stop.set()
    self._thread.join(timeout=10 * _POLL_S)

  def __del__(self):
    self._stop.set()


class _End:
  """The producer's last item: the end of `batches`, or the exception it raised."""

  def __init__(self, error: Optional[BaseException] = None):
    self.error = error


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
  while not stop.is_set():
    try:
      out.put(item, timeout=_POLL_S)
      return True
    except queue.Full:
      continue
  return False


def _produce(batches: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
  try:
    for batch in batches:
      if not _put(out, batch, stop):
        return
  except BaseException as e:  # pylint: disable=broad-except  # surfaces in the consumer
    _put(out, _End(e), stop)
    return
  _put(out, _End(), stop)


def _train_batches(images, labels, *, seed: int, shuffle: bool, global_batch: int,
                   process_index: int, local_batch: int, start_step: int,
                   transform: Callable[..., dict[str, np.ndarray]]) -> Iterator[dict]:
  """This host's batches from global step `start_step` on (the stream rules of the docstring)."""
  num = len(labels)
  epoch, order = -1, None  # positions only grow: one epoch's order at a time
  for step in itertools.count(start_step):
    rows = []
    for position in host_positions(step, global_batch, process_index, local_batch):
      if position // num != epoch:
        epoch = position // num
        order = epoch_order(seed, epoch, num, shuffle)
      k = order[position % num]
      rows.append(transform(images[k], labels[k], example_uniforms(seed, position)))
    yield {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def create_train_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                         process_count: int, start_step: int = 0) -> Prefetcher:
  """This host's infinite iterator of training batches from global step `start_step` on.

  Batches: {'image': (b, Ch, Cw, 3) float32, 'label': (b, Ch, Cw) int32}, numpy, transformed
  in a background thread dataset.prefetch batches ahead. Config mistakes raise here, errors
  while transforming at the `next()` that would have returned the batch.
  """
  d = config.dataset
  global_batch = int(config.batch_size)
  local_batch = input_pipeline.host_batch_size(global_batch, process_count, 'config.batch_size')
  images, labels = load_split(d, TRAIN_SPLIT)
  kwargs = _train_kwargs(d)

  def transform(image, label, u):
    return numpy_augment.train_transform(image, label, u, **kwargs)

  batches = _train_batches(images, labels, seed=int(config.seed),
                           shuffle=int(d.shuffle_buffer) > 1, global_batch=global_batch,
                           process_index=process_index, local_batch=local_batch,
                           start_step=int(start_step), transform=transform)
  return Prefetcher(batches, int(d.prefetch))


# ---------------------------------------------------------------------------------------------
# Eval.


def _padding_example(pad_size, label_pad_size, num_scales: int) -> dict[str, np.ndarray]:
  return {
      'image': np.zeros(tuple(pad_size) + (3,), np.float32),
      'image_size': np.zeros(2, np.int32),
      'scaled_size': np.zeros((num_scales, 2), np.int32),
      'label': np.full(tuple(label_pad_size), IGNORE_LABEL, np.int32),
      'label_size': np.zeros(2, np.int32),
      'valid': np.bool_(False),
  }


class EvalBatches(collections.abc.Sequence):
  """This host's eval batches, transformed when read: a re-iterable sequence of known length.

  Batch i holds rows [i * b, (i + 1) * b) of the host's examples, then padding (valid=False).
  """

  def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray, str]], local_batch: int,
               num_batches: int, transform: Callable[..., dict[str, np.ndarray]],
               padding: dict[str, np.ndarray]):
    self._examples = examples
    self._local_batch = local_batch
    self._num_batches = num_batches
    self._transform = transform
    self._padding = padding

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if index < 0:
      index += self._num_batches
    if not 0 <= index < self._num_batches:
      raise IndexError(f'eval batch {index} of {self._num_batches}')
    rows = []
    for j in range(index * self._local_batch, (index + 1) * self._local_batch):
      if j < len(self._examples):
        image, label, name = self._examples[j]
        rows.append(self._transform(image, label, name=name))
      else:
        rows.append(self._padding)
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def eval_shard_sizes(config: ml_collections.ConfigDict, process_count: int) -> list[int]:
  """Examples each host evaluates (after config.eval.num_examples), host 0 first."""
  n = num_examples(config.dataset, EVAL_SPLIT)
  sizes = [stop - start for start, stop in (even_range(n, i, process_count)
                                            for i in range(process_count))]
  return input_pipeline.limit_eval_shards(sizes, config)


def create_eval_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                        process_count: int, batch_shards: Optional[int] = None) -> EvalBatches:
  """This host's finite eval batches (input_pipeline's layout); as many on every host.

  `batch_shards`: data x fsdp of the mesh the batches go to (default: config.mesh over all
  devices); the global batch is `input_pipeline.eval_batch_size(config, process_count,
  batch_shards)`.
  """
  d = config.dataset
  global_batch = input_pipeline.eval_batch_size(config, process_count, batch_shards)
  local_batch = input_pipeline.host_batch_size(global_batch, process_count,
                                               'config.eval.batch_size')
  pad_size, label_pad_size = input_pipeline.eval_pad_sizes(config)
  sizes = eval_shard_sizes(config, process_count)
  n = num_examples(d, EVAL_SPLIT)
  start, _ = even_range(n, process_index, process_count)
  images, labels = load_split(d, EVAL_SPLIT)
  examples = [(images[i], labels[i], f'{d.name} {EVAL_SPLIT} #{i}')
              for i in range(start, start + sizes[process_index])]
  scales = tuple(float(r) for r in config.eval.scales)
  kwargs = dict(img_scale=tuple(d.test_img_scale), min_size=int(d.test_min_size),
                mean=tuple(d.mean), std=tuple(d.std), pad_size=pad_size,
                label_pad_size=label_pad_size, scales=scales)

  def transform(image, label, name):
    return numpy_augment.eval_transform(image, label, name=name, **kwargs)

  num_batches = -(-max(sizes) // local_batch)
  return EvalBatches(examples, local_batch, num_batches, transform,
                     _padding_example(pad_size, label_pad_size, len(scales)))
