"""PASCAL-Context (59 or 60 classes) from VOC2010 images and the official context labels.

Sources (no extra packages: the annotations come from the official `.mat` release, not
from the Detail API's `trainval_merged.json` that mmseg's converter reads):
  VOCtrainval_03-May-2010.tar  VOCdevkit/VOC2010/JPEGImages/<id>.jpg
                               VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt
  trainval.tar.gz              trainval/<id>.mat, variable 'LabelMap' (uint16) holding
                               the 459 PASCAL-Context label ids of labels.txt (1-based).
Class mapping (the 59 most frequent classes, as mmseg's converter produces them): the 59
label ids in CONTEXT_59_IDS, in increasing order, become 1..59; every other id (the other
400 classes and 0) is background 0. Increasing id order is alphabetical order of the names,
which is mmseg's class order.
  config '60': background 0 + 59 classes = 60 train ids, no ignore (mmseg
               PascalContextDataset, the released SegViT PC configs).
  config '59': reduce_zero_label: background -> 255, class k -> k - 1 (mmseg
               PascalContextDataset59, the "PC59" numbers).
Split: VOC2010 `ImageSets/Main/train.txt` (4998 images) and `val.txt` (5105 images) are the
train/val split of PASCAL-Context (the same counts as the Detail API split mmseg uses). A
VOC2010/ImageSets/SegmentationContext/{train,val}.txt from mmseg's converter, or
<manual_dir>/pascal_context_{train,val}.txt, take precedence when present.

The declaration: class names in train-id order (mmseg's PascalContextDataset /
PascalContextDataset59 CLASSES), the VOC colour table, the recipe of the released SegViT PC configs
(and its 59-class variant), the TFDS build with configs '60' and '59', and the mmseg dataset types.
"""

from __future__ import annotations

import os

from typing import Optional

from absl import logging
import ml_collections
import numpy as np

from segvit_jax.data import mmseg_rules
from segvit_jax.data import registry
from segvit_jax.data.sources import DatasetError
from segvit_jax.data.sources import archives
from segvit_jax.data.sources import checks

VOC_ARCHIVE = 'VOCtrainval_03-May-2010.tar'
VOC_FOLDER = 'VOCdevkit'
CONTEXT_ARCHIVE = 'trainval.tar.gz'
CONTEXT_FOLDER = 'trainval'
LABEL_KEY = 'LabelMap'
NUM_CONTEXT_LABELS = 459
# Ids (1-based, labels.txt of the release) of the 59 classes, increasing = train-id order.
CONTEXT_59_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454,
    458)
# split -> (VOC image list name, override list in the manual dir, official count)
SPLITS = {'train': ('train', 'pascal_context_train.txt', 4998),
          'validation': ('val', 'pascal_context_val.txt', 5105)}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Place two files in <manual_dir>:
  <manual_dir>/{VOC_ARCHIVE}
      PASCAL VOC 2010 train/val (about 1.3 GB), from
      http://host.robots.ox.ac.uk/pascal/VOC/voc2010/{VOC_ARCHIVE}
      (or extracted: <manual_dir>/{VOC_FOLDER}/VOC2010/JPEGImages/*.jpg and
       <manual_dir>/{VOC_FOLDER}/VOC2010/ImageSets/Main/{{train,val}}.txt)
  <manual_dir>/{CONTEXT_ARCHIVE}
      the PASCAL-Context train/val annotations (.mat files with '{LABEL_KEY}'), from
      https://cs.stanford.edu/~roozbeh/pascal-context/{CONTEXT_ARCHIVE}
      (or extracted: <manual_dir>/{CONTEXT_FOLDER}/<image id>.mat)
Optional: <manual_dir>/pascal_context_train.txt and pascal_context_val.txt (one image id per
line) replace the VOC2010 Main train/val split.
Then run:
  python -m segvit_jax.data.prepare pascal_context \\
      --manual_dir=<manual_dir> --data_dir=<data_dir>
"""

_CITATION = """\
@inproceedings{mottaghi2014role,
  title={The Role of Context for Object Detection and Semantic Segmentation in the Wild},
  author={Mottaghi, Roozbeh and Chen, Xianjie and Liu, Xiaobai and Cho, Nam-Gyu and
          Lee, Seong-Whan and Fidler, Sanja and Urtasun, Raquel and Yuille, Alan},
  booktitle={CVPR},
  year={2014}
}"""

CLASSES_59 = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book',
    'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food',
    'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse',
    'person', 'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves',
    'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck',
    'tvmonitor', 'wall', 'water', 'window', 'wood')

CLASSES_60 = ('background',) + CLASSES_59


def class_names(num_classes: Optional[int] = None) -> tuple[str, ...]:
  """The 60 class names (background first), or the 59 without it."""
  k = 60 if num_classes is None else num_classes
  if k not in (59, 60):
    raise ValueError(f'PASCAL-Context has 59 or 60 classes, got {k}.')
  return CLASSES_59 if k == 59 else CLASSES_60


def label_lut(num_classes: int) -> np.ndarray:
  """Raw LabelMap value (0..459) -> train id for the 60- or 59-class protocol."""
  if num_classes not in (59, 60):
    raise ValueError(f'PASCAL-Context has 59 or 60 classes, got {num_classes}.')
  background = 0 if num_classes == 60 else mmseg_rules.IGNORE_LABEL
  offset = 1 if num_classes == 60 else 0
  mapping = {i: background for i in range(NUM_CONTEXT_LABELS + 1)}
  mapping.update({cid: i + offset for i, cid in enumerate(CONTEXT_59_IDS)})
  # Raw 255 is a real context class ('monkey'), so no pass-through for it.
  return checks.make_lut(mapping, 1 << 16, keep_ignore=False)


def generate_examples(inputs: registry.BuildInputs, split: str):
  """(image id, example) of `split`, sorted, from the VOC2010 and the context archives (or their
  extracted folders), labelled for the config being built ('60' or '59')."""
  voc_source, context_source = inputs.sources
  manual_dir = inputs.manual_dir
  voc_list, override, official_count = SPLITS[split]
  lut = label_lut(inputs.config.num_classes)
  with archives.open_archive(voc_source, inputs.extract) as voc, \
      archives.open_archive(context_source, inputs.extract) as context:
    voc_names = set(voc.names())
    anchors = [n for n in voc_names if n.endswith('VOC2010/ImageSets/Main/train.txt')
               and not archives.is_junk(n)]
    if not anchors:
      raise DatasetError(
          f'{voc_source}: VOC2010/ImageSets/Main/train.txt not found.\n'
          f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    root = anchors[0][:-len('ImageSets/Main/train.txt')]  # '.../VOC2010/'
    ids = _split_ids(voc, voc_names, root, voc_list, os.path.join(manual_dir, override))
    mats = archives.match_names(context.names(), r'(?:.*/)?([^/]+)\.mat')
    checks.warn_count(logging, f'pascal_context {split}', len(ids), official_count)
    for image_id in sorted(ids):
      image_name = f'{root}JPEGImages/{image_id}.jpg'
      if image_name not in voc_names:
        raise DatasetError(
            f'{voc_source}: {image_name} (in the {split} list) is missing.')
      if image_id not in mats:
        raise DatasetError(
            f'{context_source}: no annotation {CONTEXT_FOLDER}/{image_id}.mat for '
            f'{split} image {image_id}.')
      where = f'{context_source}:{mats[image_id]}'
      raw = checks.decode_mat_label(context.read(mats[image_id]), where, LABEL_KEY)
      yield image_id, checks.make_example(
          voc.read(image_name), f'{voc_source}:{image_name}', raw, where, lut,
          file_name=f'{image_id}.jpg')


def _split_ids(voc, voc_names, root, voc_list, override_path) -> list[str]:
  """Image ids of a split: the manual-dir override, mmseg's list, or VOC2010 Main."""
  if os.path.exists(override_path):
    with open(override_path, 'rb') as f:
      return _parse_ids(f.read())
  mmseg_list = f'{root}ImageSets/SegmentationContext/{voc_list}.txt'
  if mmseg_list in voc_names:
    return _parse_ids(voc.read(mmseg_list))
  return _parse_ids(voc.read(f'{root}ImageSets/Main/{voc_list}.txt'))


def _parse_ids(data: bytes) -> list[str]:
  return [line.split()[0] for line in data.decode('utf-8').splitlines() if line.strip()]


def recipe(config: ml_collections.ConfigDict, num_classes: Optional[int] = None) -> None:
  """PASCAL-Context, 60 classes with background as the released configs: 480 crops, wd 0.03.

  num_classes=59: the 59-class protocol (background ignored), as mmseg's PascalContextDataset59.
  """
  config.num_train_steps = 80_000
  config.checkpoint_every_steps = 8000
  config.model.img_size = (480, 480)
  config.model.num_classes = 60
  config.optim.weight_decay = 0.03
  d = config.dataset
  d.name = 'pascal_context'
  d.tfds_name = 'pascal_context/60'
  d.num_classes = 60
  d.reduce_zero_label = False
  d.crop_size = (480, 480)
  d.img_scale = (520, 520)
  d.test_img_scale = (520, 520)
  d.test_min_size = 480
  d.eval_pad_size = (1536, 1536)  # short side 520, aspect ratio up to 2.95
  d.eval_label_pad_size = (512, 512)  # VOC images are at most 500 on a side
  config.eval.crop_size = (480, 480)
  config.eval.stride = (320, 320)
  if num_classes == 59:
    config.model.num_classes = d.num_classes = 59
    d.tfds_name = 'pascal_context/59'
    d.reduce_zero_label = True


DATASET = registry.register(registry.Dataset(
    name='pascal_context',
    class_names=class_names,
    recipe=recipe,
    mmseg_types={'PascalContextDataset': 60, 'PascalContextDataset59': 59},
    tfds=registry.TfdsBuild(
        version='1.0.0',
        release_notes={'1.0.0': 'Configs 59 and 60; VOC2010 Main train/val split.'},
        description=__doc__,
        homepage='https://cs.stanford.edu/~roozbeh/pascal-context/',
        citation=_CITATION,
        manual_download_instructions=MANUAL_DOWNLOAD_INSTRUCTIONS,
        sources=((VOC_ARCHIVE, VOC_FOLDER), (CONTEXT_ARCHIVE, CONTEXT_FOLDER)),
        generate_examples=generate_examples,
        configs=(
            registry.TfdsConfig(
                name='60', description='Background 0 + 59 classes (60 train ids, no ignore).',
                num_classes=60),
            registry.TfdsConfig(
                name='59', description='59 classes 0..58; background is ignored (255).',
                num_classes=59))),
))
