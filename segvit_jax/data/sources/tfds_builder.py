"""The TFDS builder of every declared dataset, and reading a prepared build as a source.

One builder base, `SegmentationBuilder`, holds what every build shares: the features (the image as
shipped, the label as a single-channel PNG of train ids, the file name), finding the downloads in
the manual directory, and one generator per split. A dataset's `registry.TfdsBuild` says what
differs (names, version, downloads, how to walk them); `register_builders` makes one builder class
per declaration and registers it with TFDS under the dataset's name ('pascal_context/59': a
builder config). Importing this module registers the builders of the datasets declared so far.
"""

from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from segvit_jax.data import datasets
from segvit_jax.data import registry
from segvit_jax.data.sources import DatasetError
from segvit_jax.data.sources import archives
from segvit_jax.data.sources import even_range

PREPARE_MODULE = 'segvit_jax.data.prepare'  # the CLI that builds them, named in messages


def _features():
  """Encoded image (JPEG as shipped), label as single-channel PNG in train ids, file name."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'file_name': tfds.features.Text(),
  })


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A semantic segmentation dataset built from its official downloads (`DATASET.tfds`)."""

  DATASET: registry.Dataset

  def _info(self):
    build = self.DATASET.tfds
    return tfds.core.DatasetInfo(
        builder=self,
        description=build.description,
        features=_features(),
        homepage=build.homepage,
        citation=build.citation,
        # Keep the sorted file order: eval results line up with file lists, and
        # training shuffles in the input pipeline anyway.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    name, build = self.DATASET.name, self.DATASET.tfds
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds: "Manual directory ... does not exist or is empty"
      raise DatasetError(f'{name}: {e}') from e
    found = [archives.find_source(manual_dir, candidates) for candidates in build.sources]
    if None in found:
      missing = [c[0] for c, path in zip(build.sources, found) if path is None]
      what = name if len(build.sources) == 1 else f'{name} (missing {", ".join(missing)})'
      raise DatasetError(
          f'{what}: the source files are missing from the manual directory '
          f'{manual_dir!s}.\n{build.manual_download_instructions}')
    config = (self.DATASET.tfds_config(self.builder_config.name)
              if build.configs else None)
    inputs = registry.BuildInputs(sources=tuple(found), manual_dir=manual_dir,
                                  extract=dl_manager.extract, config=config)
    return {split: self._generate_examples(inputs, split) for split in build.splits}

  def _generate_examples(self, inputs, split):
    yield from self.DATASET.tfds.generate_examples(inputs, split)


_BUILDERS: dict[str, type] = {}


def builder_class(dataset: registry.Dataset) -> type:
  """The TFDS builder of `dataset` (made and registered with TFDS on the first call)."""
  if dataset.name in _BUILDERS:
    return _BUILDERS[dataset.name]
  build = dataset.tfds
  namespace = {
      'name': dataset.name,
      'DATASET': dataset,
      'VERSION': tfds.core.Version(build.version),
      'RELEASE_NOTES': dict(build.release_notes),
      'MANUAL_DOWNLOAD_INSTRUCTIONS': build.manual_download_instructions,
      # The declaration's module: TFDS records it in the build's dataset_info.json.
      '__module__': build.generate_examples.__module__,
      '__doc__': build.description.split('\n')[0],
  }
  if build.configs:
    namespace['BUILDER_CONFIGS'] = [
        tfds.core.BuilderConfig(name=c.name, description=c.description) for c in build.configs]
    namespace['DEFAULT_CONFIG_NAME'] = build.configs[0].name
  class_name = ''.join(part[:1].upper() + part[1:] for part in dataset.name.split('_'))
  _BUILDERS[dataset.name] = type(class_name, (SegmentationBuilder,), namespace)
  return _BUILDERS[dataset.name]


def register_builders() -> None:
  """Registers with TFDS the builder of every declared dataset that has a TFDS build."""
  for dataset in datasets.all_datasets():
    if dataset.tfds is not None:
      builder_class(dataset)


def tfds_names() -> list[str]:
  """Every TFDS name of a declared build: 'ade20k', 'pascal_context/59', ..."""
  return [n for d in datasets.all_datasets() for n in d.tfds_names()]


def prepared_builder(dataset_config):
  """The prepared TFDS builder of `dataset_config.tfds_name`, or an actionable error."""
  register_builders()
  name = dataset_config.tfds_name
  data_dir = dataset_config.get('data_dir') or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(
        f'config.dataset.tfds_name={name!r} is not a known TFDS dataset; expected '
        f'{registry.either(tfds_names())} (import segvit_jax.data.sources.tfds_builder '
        'registers them).') from e
  if not builder.is_prepared():
    base = name.split('/')[0]
    instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '') or ''
    declared = datasets.find(base) is not None and datasets.find(base).tfds is not None
    raise DatasetError(
        f'TFDS dataset {name!r} is not prepared in {builder.data_dir_root}. Build it once '
        f'with:\n  python -m {PREPARE_MODULE} {name if declared else base}'
        f' --manual_dir=<dir with the downloads> --data_dir={builder.data_dir_root}\n'
        f'(or point config.dataset.data_dir at an existing build, or use '
        f"config.dataset.source='mmseg_folder' with an mmseg data folder).\n{instructions}")
  return builder


def tfds_source(dataset_config, split: str, shard_index: int, num_shards: int) -> tf.data.Dataset:
  """This host's block of `split` of a prepared build: encoded image and label bytes."""
  builder = prepared_builder(dataset_config)
  start, stop = even_range(
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


register_builders()
