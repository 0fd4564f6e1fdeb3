"""The shared machinery of file sources, and the contract every source keeps.

A source yields, in a fixed order and without shuffling,
  {'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W) train ids (0..K-1, 255 = ignore),
   'file_name': tf.string}
or, where the storage holds encoded files (TFDS builds, mmseg folders), 'image' as JPEG / PNG bytes
and 'label' as single-channel PNG bytes of train ids, which `tf_pipeline.decode_example` decodes
inside the tf.data graph. A source returns the part of the split given by (shard_index,
num_shards): contiguous, disjoint blocks covering the split, the first `n % num_shards` one example
longer (`even_range`, as tfds.even_splits).

Modules: `archives` (zip / tar / folder access), `checks` (checked decoding, label maps, the TFDS
example) and, with TensorFlow, `tfds_builder` (the TFDS builder of every declared dataset, and
reading a build), `mmseg_folder` (folders prepared for mmsegmentation) and `reader`
(`get_source` / `num_examples` over them). This package itself imports neither.
"""

from segvit_jax.errors import UserError


class DatasetError(UserError):
  """Bad or missing source data; the message names the file and what was expected."""


def even_range(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of `count` near-equal contiguous parts of n items.

  The first n % count parts get one extra item, as tfds.even_splits does, so every host
  reads a disjoint block and the blocks cover all n items.
  """
  if not 0 <= index < count:
    raise ValueError(f'shard_index {index} is not in [0, num_shards={count}).')
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return start, start + base + (1 if index < extra else 0)
