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

The declaration: class names in train-id order (mmseg's COCOStuffDataset.CLASSES), the VOC colour
table, the recipe of the official COCO-Stuff-10K configs, the TFDS build and the mmseg dataset type.
"""

from __future__ import annotations

import os

from absl import logging
import ml_collections
import numpy as np

from segvit_jax.data import mmseg_rules
from segvit_jax.data import registry
from segvit_jax.data.sources import DatasetError
from segvit_jax.data.sources import archives
from segvit_jax.data.sources import checks

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
  python -m segvit_jax.data.prepare coco_stuff10k \\
      --manual_dir=<manual_dir> --data_dir=<data_dir>
"""

_CITATION = """\
@inproceedings{caesar2018coco,
  title={COCO-Stuff: Thing and Stuff Classes in Context},
  author={Caesar, Holger and Uijlings, Jasper and Ferrari, Vittorio},
  booktitle={CVPR},
  year={2018}
}"""

CLASSES = (
    # 80 thing classes (COCO ids 1..90 without the 10 unused ones).
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush',
    # 91 stuff classes (COCO-Stuff ids 92..182).
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage',
    'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds',
    'counter', 'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence',
    'floor-marble', 'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog',
    'food-other', 'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill',
    'house', 'leaves', 'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud',
    'napkin', 'net', 'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform',
    'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad',
    'sand', 'sea', 'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs',
    'stone', 'straw', 'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree',
    'vegetable', 'wall-brick', 'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone',
    'wall-tile', 'wall-wood', 'water-other', 'waterdrops', 'window-blind', 'window-other',
    'wood')


def used_ids() -> list[int]:
  """The 171 COCO-Stuff ids present in the annotations, in train-id order."""
  return [i for i in range(1, MAX_ID + 1) if i not in UNUSED_IDS]


def label_lut() -> np.ndarray:
  """Raw COCO-Stuff-10K value -> train id (mmseg converter + reduce_zero_label)."""
  mapping = {0: mmseg_rules.IGNORE_LABEL}
  mapping.update({cid: i for i, cid in enumerate(used_ids())})
  return checks.make_lut(mapping, 256)


def generate_examples(inputs: registry.BuildInputs, split: str):
  """(stem, example) of the images `split`'s image list names, sorted, from the archive or its
  extracted folder."""
  [source] = inputs.sources
  list_name, official_count = SPLITS[split]
  lut = label_lut()
  with archives.open_archive(source, inputs.extract) as archive:
    names = set(archive.names())
    anchors = [n for n in names
               if n.endswith(f'imageLists/{list_name}') and not archives.is_junk(n)]
    if not anchors:
      raise DatasetError(
          f'{source}: imageLists/{list_name} not found.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    prefix = anchors[0][:-len(f'imageLists/{list_name}')]
    stems = _read_list(archive.read(anchors[0]))
    checks.warn_count(logging, f'coco_stuff10k {split}', len(stems), official_count)
    for stem in sorted(stems):
      image_name = f'{prefix}images/{stem}.jpg'
      label_name = f'{prefix}annotations/{stem}.mat'
      for n in (image_name, label_name):
        if n not in names:
          raise DatasetError(
              f'{source}: {n} is listed in imageLists/{list_name} but missing.')
      where = f'{source}:{label_name}'
      raw = checks.decode_mat_label(archive.read(label_name), where, LABEL_KEY)
      yield stem, checks.make_example(
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


def recipe(config: ml_collections.ConfigDict, num_classes=None) -> None:
  """COCO-Stuff-10K: 171 classes, 512 crops, wd 0.02, poly power 2, 80k iterations."""
  del num_classes  # one variant
  config.num_train_steps = 80_000
  config.checkpoint_every_steps = 8000
  config.model.img_size = (512, 512)
  config.model.num_classes = 171
  config.optim.weight_decay = 0.02
  config.optim.poly_power = 2.0
  d = config.dataset
  d.name = d.tfds_name = 'coco_stuff10k'
  d.num_classes = 171
  d.reduce_zero_label = True
  d.crop_size = (512, 512)
  d.img_scale = (2048, 512)
  d.test_img_scale = (2048, 512)
  d.test_min_size = 512
  d.eval_pad_size = (1536, 1536)  # short side 512, long side up to 3x
  d.eval_label_pad_size = (640, 640)  # COCO images are at most 640 on a side
  config.eval.crop_size = (512, 512)
  config.eval.stride = (341, 341)


DATASET = registry.register(registry.Dataset(
    name='coco_stuff10k',
    aliases=('coco_stuff',),
    class_names=CLASSES,
    recipe=recipe,
    mmseg_types={'COCOStuffDataset': NUM_CLASSES},
    tfds=registry.TfdsBuild(
        version='1.0.0',
        release_notes={'1.0.0': 'Train ids 0..170, 255 = unlabeled; test list = validation.'},
        description=__doc__,
        homepage='https://github.com/nightrome/cocostuff10k',
        citation=_CITATION,
        manual_download_instructions=MANUAL_DOWNLOAD_INSTRUCTIONS,
        sources=((ARCHIVE, FOLDER),),
        generate_examples=generate_examples),
))
