"""The data layer: where images and labels come from and how they become sharded batches.

- `datasets/`: one declaration per dataset (names, class names, palette, recipe, source), kept
  by `registry`; `palettes` reads their names and colours.
- `sources/`: the shared machinery of file sources: one TFDS builder base for every declared
  build, mmseg data folders, `get_source`; `prepare` is the CLI that builds a dataset.
- `mmseg_rules`: mmseg 0.24's image rules (TensorFlow-free); the transforms that apply them, as
  tf.data ops (`augment`) and in numpy (`numpy_augment`).
- `input_pipeline`: host batches of the configured source and global arrays sharded over the mesh,
  through `tf_pipeline` (file sources) or `numpy_pipeline` (in-memory sources).

TensorFlow is imported here and nowhere else, and only by the modules that read files.
"""
