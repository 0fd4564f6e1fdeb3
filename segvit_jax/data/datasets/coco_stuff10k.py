"""COCO-Stuff-10K v1.1 (171 classes), built from `cocostuff-10k-v1.1.zip`.

Layout of the official archive (no top folder):
  images/COCO_train2014_000000000077.jpg ...          (10000)
  annotations/COCO_train2014_000000000077.mat ...     (variable 'S': uint, 0 = unlabeled,
                                                       1..182 = COCO-Stuff ids)
  imageLists/train.txt (9000 names), imageLists/test.txt (1000 names; our 'validation')
Stored labels follow mmseg exactly: its converter maps the 171 ids in use (the 80 COCO thing
ids among 1..90, then stuff 92..182) to 1..171 in increasing order and keeps 0, and the
dataset's reduce_zero_label then makes 0 -> 255 and k -> k - 1. Net effect: unlabeled -> 255,
the i-th used id (i = 0..170) -> i. The 11 ids COCO never annotates (12, 26, 29, 30, 45, 66,
68, 69, 71, 83, 91) and values above 182 are rejected as out of range.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from segvit_jax.data import mmseg_rules
from segvit_jax.data.datasets import common

ARCHIVE = 'cocostuff-10k-v1.1.zip'
FOLDER = 'cocostuff-10k-v1.1'  # the archive extracted into this folder of the manual dir
NUM_CLASSES = 171
# COCO thing ids (1-based) that have no category and never appear in the annotations.
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
MAX_ID = 182
# split -> (image list in the archive, official number of images)
SPLITS = {'train': ('train.txt', 9000), 'validation': ('test.txt', 1000)}
LABEL_KEY = 'S'

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {ARCHIVE} (COCO-Stuff 10K v1.1, about 2 GB, from
http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/{ARCHIVE}) and place it as
  <manual_dir>/{ARCHIVE}
or extract it into <manual_dir>/{FOLDER}/ so that these exist:
  <manual_dir>/{FOLDER}/images/<name>.jpg
  <manual_dir>/{FOLDER}/annotations/<name>.mat      (label map in variable '{LABEL_KEY}')
  <manual_dir>/{FOLDER}/imageLists/train.txt
  <manual_dir>/{FOLDER}/imageLists/test.txt
Then run:
  python -m segvit_jax.data.datasets.prepare coco_stuff10k \\
      --manual_dir=<manual_dir> --data_dir=<data_dir>
"""

_CITATION = """\
@inproceedings{caesar2018coco,
  title={COCO-Stuff: Thing and Stuff Classes in Context},
  author={Caesar, Holger and Uijlings, Jasper and Ferrari, Vittorio},
  booktitle={CVPR},
  year={2018}
}"""


def used_ids() -> list[int]:
  """The 171 COCO-Stuff ids present in the annotations, in train-id order."""
  return [i for i in range(1, MAX_ID + 1) if i not in UNUSED_IDS]


def label_lut() -> np.ndarray:
  """Raw COCO-Stuff-10K value -> train id (mmseg converter + reduce_zero_label)."""
  mapping = {0: mmseg_rules.IGNORE_LABEL}
  mapping.update({cid: i for i, cid in enumerate(used_ids())})
  return common.make_lut(mapping, 256)


class CocoStuff10k(tfds.core.GeneratorBasedBuilder):
  """COCO-Stuff-10K v1.1 semantic segmentation, mmseg's 171 train ids."""

  name = 'coco_stuff10k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Train ids 0..170, 255 = unlabeled; test list = validation.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self):
    return common.dataset_info(
        self, description=__doc__,
        homepage='https://github.com/nightrome/cocostuff10k', citation=_CITATION)

  def _split_generators(self, dl_manager):
    manual_dir = common.manual_dir(dl_manager, 'coco_stuff10k', MANUAL_DOWNLOAD_INSTRUCTIONS)
    source = common.find_source(manual_dir, [ARCHIVE, FOLDER])
    if source is None:
      raise common.missing_source_error('coco_stuff10k', manual_dir, MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: self._generate_examples(source, split, dl_manager.extract)
            for split in SPLITS}

  def _generate_examples(self, source, split, extract=None):
    list_name, official_count = SPLITS[split]
    lut = label_lut()
    with common.open_archive(source, extract) as archive:
      names = set(archive.names())
      anchors = [n for n in names
                 if n.endswith(f'imageLists/{list_name}') and not common.is_junk(n)]
      if not anchors:
        raise common.DatasetError(
            f'{source}: imageLists/{list_name} not found.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
      prefix = anchors[0][:-len(f'imageLists/{list_name}')]
      stems = _read_list(archive.read(anchors[0]))
      common.warn_count(logging, f'coco_stuff10k {split}', len(stems), official_count)
      for stem in sorted(stems):
        image_name = f'{prefix}images/{stem}.jpg'
        label_name = f'{prefix}annotations/{stem}.mat'
        for n in (image_name, label_name):
          if n not in names:
            raise common.DatasetError(
                f'{source}: {n} is listed in imageLists/{list_name} but missing.')
        where = f'{source}:{label_name}'
        raw = common.decode_mat_label(archive.read(label_name), where, LABEL_KEY)
        yield stem, common.make_example(
            archive.read(image_name), f'{source}:{image_name}', raw, where, lut,
            file_name=os.path.basename(image_name))


def _read_list(data: bytes) -> list[str]:
  """Image names of an image list: one per line, extension optional, blanks skipped."""
  stems = []
  for line in data.decode('utf-8').splitlines():
    line = line.strip()
    if line:
      stems.append(os.path.splitext(os.path.basename(line))[0] if line.endswith('.jpg')
                   else line)
  return stems
