"""What a dataset declaration holds (`Dataset`), and the registry that maps names to them.

A dataset is declared once, in its own file of `segvit_jax.data.datasets` (or by any other code,
before a run reads it): its names, class names, palette, the config changes a paper config makes
for it (`recipe`), the official mmseg dataset types that imply it, and where its examples come
from: a TFDS build of the official files (`TfdsBuild`, built by
`segvit_jax.data.sources.tfds_builder`) or an in-memory source (`InMemorySource`, read by
`segvit_jax.data.numpy_pipeline`). Everything that needs a dataset's facts (palettes, the
prepare CLI, the file and in-memory sources, mmcv configs) reads them here, through
`segvit_jax.data.datasets`, which registers the built-in declarations on import.

    registry.register(registry.Dataset(
        name='toy', class_names=('background', 'thing'),
        in_memory=registry.InMemorySource(num_examples=..., load=...)))
    config.dataset.name = config.dataset.source = 'toy'

No TensorFlow: the declarations and everything that reads them import without it.
"""

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import ml_collections
import numpy as np

# A dataset's class names indexed by train id, or a function of the number of classes (None: the
# dataset's default) for a dataset whose variants differ in K.
ClassNames = Union[Sequence[str], Callable[[Optional[int]], Sequence[str]]]
# recipe(config, num_classes): the changes a paper config makes for the dataset; num_classes picks
# a variant (None: the default one).
Recipe = Callable[[ml_collections.ConfigDict, Optional[int]], None]


@dataclasses.dataclass(frozen=True)
class TfdsConfig:
  """One TFDS builder config of a dataset ('pascal_context/59'), and the K its labels hold."""
  name: str
  description: str
  num_classes: int


@dataclasses.dataclass(frozen=True)
class BuildInputs:
  """What the TFDS build hands a dataset's example generator."""
  sources: tuple[str, ...]  # the path found for each entry of TfdsBuild.sources, in order
  manual_dir: str
  extract: Callable[[str], str]  # compressed archive -> the folder it was extracted to
  config: Optional[TfdsConfig]  # the builder config being built, if the dataset has configs


@dataclasses.dataclass(frozen=True)
class TfdsBuild:
  """How `segvit_jax.data.prepare` builds a dataset into TFDS from the official downloads.

  The shared builder (`sources.tfds_builder`) finds `sources` in the manual directory and writes
  what `generate_examples(inputs, split)` yields: (key, example) pairs, the examples made by
  `sources.checks.make_example` (encoded image, single-channel PNG label in train ids, file
  name), in a fixed order.
  """
  version: str
  release_notes: Mapping[str, str]
  description: str
  homepage: str
  citation: str
  manual_download_instructions: str
  # Per source, the names (a file or a folder) it may have in the manual directory.
  sources: tuple[tuple[str, ...], ...]
  generate_examples: Callable[[BuildInputs, str], Iterator[tuple[str, dict]]]
  splits: tuple[str, ...] = ('train', 'validation')
  configs: tuple[TfdsConfig, ...] = ()  # the first one is the default


@dataclasses.dataclass(frozen=True)
class InMemorySource:
  """A split rendered or held in memory, read by `numpy_pipeline` (no files, no TensorFlow)."""
  # num_examples(config.dataset, split) -> examples of the split over all hosts
  num_examples: Callable[[ml_collections.ConfigDict, str], int]
  # load(config.dataset, split) -> (images, labels): images[i] (H, W, 3) uint8 RGB, labels[i]
  # (H, W) uint8 train ids (255 = ignore), indexable by example
  load: Callable[[ml_collections.ConfigDict, str], tuple[Any, Any]]
  # split -> the config.dataset key that sets its size, named when the split is empty
  split_size_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)  # one object per dataset: compared by identity
class Dataset:
  """One dataset: its names, classes, palette, recipe and source.

  `config.dataset.name` names it; `config.dataset.source` is 'tfds' (a build of `tfds`, named by
  config.dataset.tfds_name), 'mmseg_folder', or the name of a dataset with an `in_memory` source.
  """
  name: str
  class_names: ClassNames
  palette: Optional[np.ndarray] = None  # (K, 3) uint8 RGB; None: the VOC colour table
  recipe: Optional[Recipe] = None  # None: the base config's defaults are this dataset's
  # The official mmseg dataset classes (`dataset_type` of an mmcv config) -> the K each implies.
  mmseg_types: Mapping[str, int] = dataclasses.field(default_factory=dict)
  tfds: Optional[TfdsBuild] = None
  in_memory: Optional[InMemorySource] = None
  aliases: tuple[str, ...] = ()  # other names `palettes` accepts

  def classes(self, num_classes: Optional[int] = None) -> tuple[str, ...]:
    """The class names, indexed by train id; ValueError when `num_classes` is not the K."""
    names = self.class_names
    names = tuple(names(num_classes) if callable(names) else names)
    if num_classes is not None and num_classes != len(names):
      raise ValueError(f'{self.name} has {len(names)} classes, the config says {num_classes}.')
    return names

  def tfds_config(self, name: str) -> TfdsConfig:
    """The TFDS builder config `name` ('59' of 'pascal_context/59')."""
    for config in self.tfds.configs if self.tfds else ():
      if config.name == name:
        return config
    raise ValueError(f'{self.name} has no TFDS config {name!r}.')

  def tfds_names(self) -> tuple[str, ...]:
    """The TFDS names a build of this dataset answers to: 'name', or 'name/config' sorted."""
    if self.tfds is None:
      return ()
    if not self.tfds.configs:
      return (self.name,)
    return tuple(sorted(f'{self.name}/{c.name}' for c in self.tfds.configs))

  def apply_recipe(self, config: ml_collections.ConfigDict,
                   num_classes: Optional[int] = None) -> None:
    """Changes `config` (from `config.get_base_config()`) to this dataset's paper setting."""
    if self.recipe is not None:
      self.recipe(config, num_classes)


_DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  """Adds `dataset` under its name and aliases; ValueError when one of them is taken by another
  declaration (registering the same one again changes nothing)."""
  for name in (dataset.name,) + tuple(dataset.aliases):
    known = _DATASETS.get(name)
    if known is not None and known is not dataset:
      raise ValueError(f'dataset name {name!r} is already registered (by {known.name!r}).')
  for name in (dataset.name,) + tuple(dataset.aliases):
    _DATASETS[name] = dataset
  return dataset


def find(name: str) -> Optional[Dataset]:
  """The dataset registered as `name` (a name or an alias), or None."""
  return _DATASETS.get(name)


def get(name: str) -> Dataset:
  """The dataset registered as `name`; ValueError naming the known ones otherwise."""
  dataset = _DATASETS.get(name)
  if dataset is None:
    raise ValueError(f'Unknown dataset {name!r}: expected {either(names())}.')
  return dataset


def names() -> tuple[str, ...]:
  """The registered datasets' names (not aliases), in registration order."""
  return tuple(n for n, d in _DATASETS.items() if n == d.name)


def all_datasets() -> tuple[Dataset, ...]:
  """The registered datasets, in registration order."""
  return tuple(_DATASETS[n] for n in names())


def by_mmseg_type(mmseg_type: Any) -> Optional[tuple[Dataset, int]]:
  """(dataset, K) for an official mmseg dataset class name, or None when no dataset claims it."""
  for dataset in all_datasets():
    if mmseg_type in dataset.mmseg_types:
      return dataset, dataset.mmseg_types[mmseg_type]
  return None


def either(items: Sequence[str]) -> str:
  """'a', 'a or b', 'a, b or c': the choices named in a message."""
  items = list(items)
  return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' or ' + items[-1]
