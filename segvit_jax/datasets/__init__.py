"""Data sources of segvit_jax: TFDS builders, mmseg folders and a synthetic task.

Importing this package registers the TFDS builders `ade20k`, `coco_stuff10k` and
`pascal_context` (configs '59' and '60'). Build one with
  python -m segvit_jax.datasets.prepare NAME --manual_dir=M --data_dir=D
and read any source with `get_source(config.dataset, split, shard_index=, num_shards=)`.
"""

from segvit_jax.datasets import ade20k  # registers 'ade20k'
from segvit_jax.datasets import coco_stuff10k  # registers 'coco_stuff10k'
from segvit_jax.datasets import pascal_context  # registers 'pascal_context/{59,60}'
from segvit_jax.datasets.common import DatasetError
from segvit_jax.datasets.sources import get_source
from segvit_jax.datasets.sources import num_examples
from segvit_jax.palettes import class_names
from segvit_jax.palettes import palette

__all__ = ['DatasetError', 'class_names', 'get_source', 'num_examples', 'palette',
           'ade20k', 'coco_stuff10k', 'pascal_context']
