"""The datasets segvit_jax declares, one file each: ade20k, coco_stuff10k, pascal_context (TFDS
builds of the official downloads) and synthetic (rendered in memory).

Importing this package registers them (`segvit_jax.data.registry`) and imports no TensorFlow:
a declaration holds facts and plain-Python build steps; TFDS and tf.data come with
`segvit_jax.data.sources`. Look a dataset up by name with `get` ('ade20k'), or by the official
mmseg dataset type with `by_mmseg_type`; declare another with `register`.
"""

from segvit_jax.data.datasets import ade20k
from segvit_jax.data.datasets import coco_stuff10k
from segvit_jax.data.datasets import pascal_context
from segvit_jax.data.datasets import synthetic
from segvit_jax.data.registry import (BuildInputs, Dataset, InMemorySource, TfdsBuild, TfdsConfig,
                                      all_datasets, by_mmseg_type, find, get, names, register)

__all__ = ['BuildInputs', 'Dataset', 'InMemorySource', 'TfdsBuild', 'TfdsConfig', 'ade20k',
           'all_datasets', 'by_mmseg_type', 'coco_stuff10k', 'find', 'get', 'names',
           'pascal_context', 'register', 'synthetic']
