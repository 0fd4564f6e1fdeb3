"""`get_source`: one tf.data interface over the file sources: TFDS builds and mmseg folders.

Every source keeps the contract of `segvit_jax.data.sources` (example layout, host blocks).
Evaluation shards by host; training reads the whole split on every host (see input_pipeline).
In-memory sources (a dataset declared with `in_memory`, e.g. 'synthetic') have no tf.data form:
`segvit_jax.data.numpy_pipeline` serves them (`num_examples` still counts them).
"""

from __future__ import annotations

import tensorflow as tf

from segvit_jax.data import datasets
from segvit_jax.data import registry
from segvit_jax.data.sources import mmseg_folder
from segvit_jax.data.sources import tfds_builder


def _in_memory(kind: str):
  dataset = datasets.find(kind)
  return dataset.in_memory if dataset is not None else None


def _in_memory_names() -> str:
  return registry.either([repr(d.name) for d in datasets.all_datasets() if d.in_memory])


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
    return tfds_builder.tfds_source(dataset_config, split, shard_index, num_shards)
  if kind == 'mmseg_folder':
    return mmseg_folder.source(dataset_config, split, shard_index, num_shards)
  if _in_memory(kind) is not None:
    raise ValueError(f'config.dataset.source={kind!r} is an in-memory source without a tf.data '
                     'form: segvit_jax.data.numpy_pipeline serves it (input_pipeline picks it).')
  raise ValueError(f"config.dataset.source={kind!r}; expected 'tfds' or 'mmseg_folder' ("
                   f'or {_in_memory_names()}, read by segvit_jax.data.numpy_pipeline).')


def num_examples(dataset_config, split: str) -> int:
  """Number of examples of `split` over all hosts."""
  kind = dataset_config.source
  if kind == 'tfds':
    return int(tfds_builder.prepared_builder(dataset_config).info.splits[split].num_examples)
  if kind == 'mmseg_folder':
    return mmseg_folder.num_examples(dataset_config, split)
  if _in_memory(kind) is not None:
    return _in_memory(kind).num_examples(dataset_config, split)
  raise ValueError(f"config.dataset.source={kind!r}; expected 'tfds', 'mmseg_folder' or "
                   f'{_in_memory_names()}.')
