"""The data layer: where images and labels come from and how they become sharded batches.

Dataset sources (TFDS builders of the official archives, mmseg data folders, a synthetic task),
mmseg 0.24's image rules (`mmseg_rules`, TensorFlow-free), the training and test transforms
(`augment`, tf.data ops), and the input pipelines that turn a source into global arrays sharded
over the mesh (`input_pipeline`; `tf_pipeline` for file sources, `numpy_pipeline` for in-memory
ones). TensorFlow is imported here and nowhere else, and only by the modules that read files.
"""
