"""Data sources of segvit_jax: TFDS builders, mmseg folders and a synthetic task.

The TFDS builders `ade20k`, `coco_stuff10k` and `pascal_context` (configs '59' and '60') are
registered when `segvit_jax.data.datasets.sources` (or the builder's module) is imported. Build one with
  python -m segvit_jax.data.datasets.prepare NAME --manual_dir=M --data_dir=D
and read a file source with `get_source(config.dataset, split, shard_index=, num_shards=)`.

Importing this package imports nothing else: TensorFlow and TFDS load with the modules that use
them (`sources` and the builders), so the synthetic source and everything outside the data layer
run without them. Its names resolve on first use.
"""

import importlib

_NAMES = {
    'DatasetError': 'segvit_jax.data.datasets.common',
    'get_source': 'segvit_jax.data.datasets.sources',
    'num_examples': 'segvit_jax.data.datasets.sources',
    'class_names': 'segvit_jax.data.palettes',
    'palette': 'segvit_jax.data.palettes',
}
_MODULES = ('ade20k', 'coco_stuff10k', 'pascal_context', 'common', 'mmseg_folder', 'prepare',
            'sources', 'synthetic')

__all__ = sorted(_NAMES) + list(_MODULES)


def __getattr__(name: str):
  if name in _NAMES:
    return getattr(importlib.import_module(_NAMES[name]), name)
  if name in _MODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
