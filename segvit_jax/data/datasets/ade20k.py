"""ADE20K SceneParsing benchmark (150 classes), built from `ADEChallengeData2016.zip`.

Layout of the official archive:
  ADEChallengeData2016/images/training/ADE_train_%08d.jpg        (20210)
  ADEChallengeData2016/images/validation/ADE_val_%08d.jpg        (2000)
  ADEChallengeData2016/annotations/{training,validation}/<same stem>.png
Annotation PNGs hold 0 = "other" and 1..150 = classes. Stored labels are train ids as mmseg's
reduce_zero_label makes them: 0 -> 255 (ignore), k -> k - 1, 255 stays 255.
Note: this is not TFDS's `scene_parse150` (a different task with instance maps).
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from segvit_jax.data import mmseg_rules
from segvit_jax.data.datasets import common

ARCHIVE = 'ADEChallengeData2016.zip'
FOLDER = 'ADEChallengeData2016'  # the archive extracted in the manual directory
NUM_CLASSES = 150
# split -> (folder name in the archive, official number of images)
SPLITS = {'train': ('training', 20210), 'validation': ('validation', 2000)}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {ARCHIVE} (the SceneParsing / ADE20K-150 benchmark, about 923 MB, from the MIT
Scene Parsing site: http://data.csail.mit.edu/places/ADEchallenge/{ARCHIVE}) and place it as
  <manual_dir>/{ARCHIVE}
or extract it there so that these folders exist:
  <manual_dir>/{FOLDER}/images/training/ADE_train_00000001.jpg ...
  <manual_dir>/{FOLDER}/images/validation/ADE_val_00000001.jpg ...
  <manual_dir>/{FOLDER}/annotations/training/ADE_train_00000001.png ...
  <manual_dir>/{FOLDER}/annotations/validation/ADE_val_00000001.png ...
Then run:
  python -m segvit_jax.data.datasets.prepare ade20k \\
      --manual_dir=<manual_dir> --data_dir=<data_dir>
"""

_CITATION = """\
@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and Barriuso, Adela
          and Torralba, Antonio},
  booktitle={CVPR},
  year={2017}
}"""


def label_lut() -> np.ndarray:
  """Raw ADE value -> train id: 0 -> 255, 1..150 -> 0..149, 255 -> 255."""
  mapping = {0: mmseg_rules.IGNORE_LABEL}
  mapping.update({k: k - 1 for k in range(1, NUM_CLASSES + 1)})
  return common.make_lut(mapping, 256)


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K-150 semantic segmentation (SceneParsing challenge 2016), mmseg label ids."""

  name = 'ade20k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Train ids 0..149, 255 = ignore (label 0 "other").'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self):
    return common.dataset_info(
        self, description=__doc__,
        homepage='http://sceneparsing.csail.mit.edu/', citation=_CITATION)

  def _split_generators(self, dl_manager):
    manual_dir = common.manual_dir(dl_manager, 'ade20k', MANUAL_DOWNLOAD_INSTRUCTIONS)
    source = common.find_source(manual_dir, [ARCHIVE, FOLDER])
    if source is None:
      raise common.missing_source_error('ade20k', manual_dir, MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: self._generate_examples(source, split, dl_manager.extract)
            for split in SPLITS}

  def _generate_examples(self, source, split, extract=None):
    subset, official_count = SPLITS[split]
    lut = label_lut()
    with common.open_archive(source, extract) as archive:
      names = archive.names()
      images = common.match_names(names, rf'(?:.*/)?images/{subset}/([^/]+)\.jpg')
      labels = common.match_names(names, rf'(?:.*/)?annotations/{subset}/([^/]+)\.png')
      if not images:
        raise common.DatasetError(
            f'{source}: no images matching {FOLDER}/images/{subset}/*.jpg.\n'
            f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
      common.warn_count(logging, f'ade20k {split}', len(images), official_count)
      for stem in sorted(images):
        image_name = images[stem]
        if stem not in labels:
          raise common.DatasetError(
              f'{source}: {image_name} has no annotation '
              f'{FOLDER}/annotations/{subset}/{stem}.png.')
        image_bytes = archive.read(image_name)
        where = f'{source}:{labels[stem]}'
        raw = common.decode_png_label(archive.read(labels[stem]), where)
        yield stem, common.make_example(
            image_bytes, f'{source}:{image_name}', raw, where, lut,
            file_name=os.path.basename(image_name))
