"""Input pipelines: host batches of the configured source, and global arrays sharded over a mesh.

Two pipelines yield the same batches by the same rules:
- `numpy_pipeline` for in-memory sources (a dataset declared with `in_memory`, e.g.
  `config.dataset.source='synthetic'`): numpy only, so the demo, the benchmarks and GPU machines
  need no TensorFlow;
- `tf_pipeline` (tf.data) for file sources ('tfds' builds, 'mmseg_folder'): needs TensorFlow.
`create_train_dataset` / `create_eval_dataset` pick one by the source.

Train: an infinite stream of host batches
  {'image': (b, Ch, Cw, 3) float32 normalised, 'label': (b, Ch, Cw) int32, 255 = ignore/padding}
with b = config.batch_size // process_count. The global stream does not depend on the number of
hosts: every host reads the whole split in the same order (each epoch shuffled with a seed derived
from (config.seed, epoch), the epochs chained), and host h keeps rows [h * b, (h + 1) * b) of each
global batch of config.batch_size, dropping the others before decoding and augmentation. Example
p of the global stream belongs to step p // batch_size and its augmentation is keyed on
(config.seed, p). So a run on 2 hosts trains on exactly the batches of a run on 1 host or 16, and a
run restarted with `start_step=s` (on any number of hosts) yields exactly the batches an
uninterrupted run yields from step s: whole epochs are skipped arithmetically, the rest of the
epoch before the augmentation stage.

Eval: finite, host batches of b = B // process_count, where B is config.eval.batch_size rounded up
to a multiple of the mesh's batch shards (data x fsdp) and of the process count
(`sharding.padded_batch_size`), so that any eval batch size works on any mesh:
  {'image': (b, Hb, Wb, 3) float32, test-resized, normalised, 0-padded to dataset.eval_pad_size;
   'image_size': (b, 2) int32 resized (h, w); 'scaled_size': (b, len(config.eval.scales), 2) int32
   resized (h, w) at each test ratio; 'label': (b, Hl, Wl) int32 original resolution,
   255-padded to dataset.eval_label_pad_size; 'label_size': (b, 2) int32; 'valid': (b,) bool}.
Every host yields the same number of batches; missing examples are padding with valid=False.

`make_global_batch` / `global_batches` turn host batches into `jax.Array`s sharded over the mesh's
batch axes (`sharding.batch_sharding`; multi-host: each process contributes its rows).
"""

import collections
import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from segvit_jax import errors
from segvit_jax import sharding
from segvit_jax.data import datasets
from segvit_jax.errors import UserError

TRAIN_SPLIT = 'train'
EVAL_SPLIT = 'validation'


def pipeline_for(config: ml_collections.ConfigDict,
                 source_fn: Optional[Callable[..., Any]] = None):
  """The module that reads config.dataset.source (`source_fn`: a tf.data source, tests)."""
  source = config.dataset.source
  dataset = datasets.find(source)
  if source_fn is None and dataset is not None and dataset.in_memory is not None:
    from segvit_jax.data import numpy_pipeline  # pylint: disable=g-import-not-at-top
    return numpy_pipeline
  return errors.import_tensorflow_module(
      'segvit_jax.data.tf_pipeline',
      f"config.dataset.source={source!r} (read with tf.data; source 'synthetic' is not)")


def create_train_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                         process_count: int, start_step: int = 0,
                         source_fn: Optional[Callable[..., Any]] = None) -> Iterable[Any]:
  """This host's infinite stream of training batches from global step `start_step` on.

  Args:
    config: the experiment config (uses seed, batch_size and dataset.*).
    process_index, process_count: this host and the number of hosts (jax.process_index/count()).
    start_step: the global step of the first batch (resuming from a checkpoint).
    source_fn: a tf.data source replacing `segvit_jax.data.sources.reader.get_source` (tests,
      benchmarks).
  """
  kwargs = dict(process_index=process_index, process_count=process_count, start_step=start_step)
  if source_fn is not None:
    kwargs['source_fn'] = source_fn
  return pipeline_for(config, source_fn).create_train_dataset(config, **kwargs)


def create_eval_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                        process_count: int, batch_shards: Optional[int] = None,
                        source_fn: Optional[Callable[..., Any]] = None) -> Iterable[Any]:
  """This host's finite eval batches; the same number of batches on every host.

  `batch_shards`: data x fsdp of the mesh the batches go to (default: config.mesh over all
  devices); the global batch is `eval_batch_size(config, process_count, batch_shards)`.
  """
  kwargs = dict(process_index=process_index, process_count=process_count,
                batch_shards=batch_shards)
  if source_fn is not None:
    kwargs['source_fn'] = source_fn
  return pipeline_for(config, source_fn).create_eval_dataset(config, **kwargs)


def eval_shard_sizes(config: ml_collections.ConfigDict, process_count: int,
                     source_fn: Optional[Callable[..., Any]] = None) -> list[int]:
  """Examples each host evaluates (after config.eval.num_examples), host 0 first."""
  pipeline = pipeline_for(config, source_fn)
  if source_fn is not None:
    return pipeline.eval_shard_sizes(config, process_count, source_fn)
  return pipeline.eval_shard_sizes(config, process_count)


# ---------------------------------------------------------------------------------------------
# Sizes: one rule for both pipelines.


def host_batch_size(global_batch_size: int, process_count: int, what: str) -> int:
  """global / process_count, with an error naming the config key when it does not divide."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f'{what}={global_batch_size} must be a positive multiple of the number of '
                    f'processes ({process_count}).')
  return global_batch_size // process_count


def limit_eval_shards(sizes: Sequence[int], config: ml_collections.ConfigDict) -> list[int]:
  """Per-host eval sizes after config.eval.num_examples (<= 0: all): about that many examples in
  total, the first ceil(limit / hosts) of each host's shard."""
  limit = int(config.eval.num_examples)
  if limit <= 0:
    return list(sizes)
  return [min(s, math.ceil(limit / len(sizes))) for s in sizes]


def eval_pad_sizes(config: ml_collections.ConfigDict) -> tuple[tuple[int, int], tuple[int, int]]:
  """The static (h, w) buckets of eval images (resized) and labels (original size).

  Their values are checked against the model (patch size) by `segvit_jax.training.preflight`.
  """
  d = config.dataset
  image = tuple(int(s) for s in d.eval_pad_size)
  label = tuple(int(s) for s in d.eval_label_pad_size)
  for key, size in (('eval_pad_size', image), ('eval_label_pad_size', label)):
    if len(size) != 2 or min(size) <= 0:
      raise UserError(f'config.dataset.{key}={size} must be a positive (h, w).')
  return image, label


def eval_batch_size(config: ml_collections.ConfigDict, process_count: int,
                    batch_shards: Optional[int] = None) -> int:
  """The global eval batch: config.eval.batch_size rounded up to the shards and processes.

  `batch_shards`: data x fsdp of the mesh; default from config.mesh over all devices.
  """
  if batch_shards is None:
    batch_shards = sharding.batch_shards(sharding.parse_mesh_spec(config.mesh, jax.device_count()))
  return sharding.padded_batch_size(int(config.eval.batch_size), batch_shards, process_count)


# ---------------------------------------------------------------------------------------------
# Global arrays.


def make_global_batch(host_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host batch (numpy, leading dim = this process's rows) -> global `jax.Array`s.

  The global batch is the concatenation of every process's rows in process order. Non-numeric
  entries (strings) are dropped: they cannot live on devices.
  """
  sharding_ = sharding.batch_sharding(mesh)
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in 'biuf':
      continue
    out[key] = jax.make_array_from_process_local_data(sharding_, value)
  return out


def global_batches(host_batches: Iterable[Any], mesh: Mesh,
                   prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Iterates host batches (a tf.data.Dataset or any iterable of numpy dicts) as global arrays,
  keeping `prefetch` batches on device ahead."""
  as_numpy = getattr(host_batches, 'as_numpy_iterator', None)  # tf.data
  iterator = as_numpy() if as_numpy is not None else iter(host_batches)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(make_global_batch(batch, mesh))

  enqueue(prefetch + 1)
  while queue:
    yield queue.popleft()
    enqueue(1)
