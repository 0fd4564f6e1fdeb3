"""`get_source`: one tf.data interface over the file sources: TFDS builds and mmseg folders.

Every source yields, in a fixed order and without shuffling,
  {'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W) train ids (0..K-1, 255 = ignore),
   'file_name': tf.string}
or, where the storage holds encoded files (TFDS builds, mmseg folders), 'image' as JPEG / PNG bytes
and 'label' as single-channel PNG bytes of train ids, which `tf_pipeline.decode_example`
decodes inside the tf.data graph. A source returns the part of the split given by (shard_index,
num_shards): contiguous, disjoint blocks covering the split, the first `n % num_shards` one
example longer (as tfds.even_splits). Evaluation shards by host; training reads the whole split
on every host (see input_pipeline). The in-memory 'synthetic' source has no tf.data form: it is
served by `segvit_jax.data.numpy_pipeline` (`num_examples` still counts it).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

# The builders register their TFDS names on import.
from segvit_jax.data.datasets import ade20k  # noqa: F401  # pylint: disable=unused-import
from segvit_jax.data.datasets import coco_stuff10k  # noqa: F401  # pylint: disable=unused-import
from segvit_jax.data.datasets import common
from segvit_jax.data.datasets import mmseg_folder
from segvit_jax.data.datasets import pascal_context  # noqa: F401  # pylint: disable=unused-import
from segvit_jax.data.datasets import synthetic

_PREPARE_NAMES = {'ade20k': 'ade20k', 'coco_stuff10k': 'coco_stuff10k',
                  'pascal_context': 'pascal_context'}


def _builder(dataset_config):
  """The prepared TFDS builder of `dataset_config.tfds_name`, or an actionable error."""
  name = dataset_config.tfds_name
  data_dir = dataset_config.get('data_dir') or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise common.DatasetError(
        f'config.dataset.tfds_name={name!r} is not a known TFDS dataset; expected ade20k, '
        'coco_stuff10k, pascal_context/59 or pascal_context/60 (import '
        'segvit_jax.data.datasets registers them).') from e
  if not builder.is_prepared():
    base = name.split('/')[0]
    instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '') or ''
    raise common.DatasetError(
        f'TFDS dataset {name!r} is not prepared in {builder.data_dir_root}. Build it once '
        f'with:\n  python -m segvit_jax.data.datasets.prepare {name if base in _PREPARE_NAMES else base}'
        f' --manual_dir=<dir with the downloads> --data_dir={builder.data_dir_root}\n'
        f'(or point config.dataset.data_dir at an existing build, or use '
        f"config.dataset.source='mmseg_folder' with an mmseg data folder).\n{instructions}")
  return builder


def _tfds_source(dataset_config, split, shard_index, num_shards):
  builder = _builder(dataset_config)
  start, stop = common.even_range(
      int(builder.info.splits[split].num_examples), shard_index, num_shards)
  read_config = tfds.ReadConfig(try_autocache=False)
  # Encoded bytes flow on: the pipeline decodes after shuffling and selecting this host's rows.
  kwargs = dict(shuffle_files=False, read_config=read_config,
                decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()})
  if start == stop:  # more hosts than examples: an empty block with the right structure
    ds = builder.as_dataset(split=split, **kwargs).take(0)
  else:
    ds = builder.as_dataset(split=tfds.even_splits(split, n=num_shards)[shard_index], **kwargs)

  def fmt(ex):  # image: JPEG or PNG bytes; label: single-channel PNG bytes
    return {'image': ex['image'], 'label': ex['label'], 'file_name': ex['file_name']}

  return ds.map(fmt, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def get_source(dataset_config, split: str, *, shard_index: int = 0,
               num_shards: int = 1) -> tf.data.Dataset:
  """This host's examples of `split` ('train' or 'validation') of the configured source.

  Args:
    dataset_config: `config.dataset`; `source` picks 'tfds' (`tfds_name`, `data_dir`) or
      'mmseg_folder' (`folder`, `reduce_zero_label`, `num_classes`).
    split: 'train' or 'validation' (a TFDS split expression is accepted for 'tfds').
    shard_index: this host's index, usually jax.process_index().
    num_shards: number of hosts, usually jax.process_count().
  """
  kind = dataset_config.source
  if kind == 'tfds':
    return _tfds_source(dataset_config, split, shard_index, num_shards)
  if kind == 'mmseg_folder':
    return mmseg_folder.source(dataset_config, split, shard_index, num_shards)
  if kind == 'synthetic':
    raise ValueError("config.dataset.source='synthetic' is an in-memory source without a tf.data "
                     'form: segvit_jax.data.numpy_pipeline serves it (input_pipeline picks it).')
  raise ValueError(f"config.dataset.source={kind!r}; expected 'tfds' or 'mmseg_folder' ("
                   "or 'synthetic', read by segvit_jax.data.numpy_pipeline).")


def num_examples(dataset_config, split: str) -> int:
  """Number of examples of `split` over all hosts."""
  kind = dataset_config.source
  if kind == 'tfds':
    return int(_builder(dataset_config).info.splits[split].num_examples)
  if kind == 'mmseg_folder':
    return mmseg_folder.num_examples(dataset_config, split)
  if kind == 'synthetic':
    return synthetic.num_examples(dataset_config, split)
  raise ValueError(f"config.dataset.source={kind!r}; expected 'tfds', 'mmseg_folder' or "
                   "'synthetic'.")
