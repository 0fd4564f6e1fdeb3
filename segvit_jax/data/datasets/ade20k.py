"""ADE20K SceneParsing benchmark (150 classes), built from `ADEChallengeData2016.zip`.

Layout of the official archive:
  ADEChallengeData2016/images/training/ADE_train_%08d.jpg        (20210)
  ADEChallengeData2016/images/validation/ADE_val_%08d.jpg        (2000)
  ADEChallengeData2016/annotations/{training,validation}/<same stem>.png
Annotation PNGs hold 0 = "other" and 1..150 = classes. Stored labels are train ids as mmseg's
reduce_zero_label makes them: 0 -> 255 (ignore), k -> k - 1, 255 stays 255.
Note: this is not TFDS's `scene_parse150` (a different task with instance maps).

The declaration: class names in train-id order (mmseg's ADE20KDataset.CLASSES), the VOC colour
table, no recipe (the base config, `segvit_jax.config.get_base_config`, is ADE20K's official
setting), the TFDS build and the mmseg dataset type.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np

from segvit_jax.data import mmseg_rules
from segvit_jax.data import registry
from segvit_jax.data.sources import DatasetError
from segvit_jax.data.sources import archives
from segvit_jax.data.sources import checks

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
  python -m segvit_jax.data.prepare ade20k \\
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

CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant',
    'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror',
    'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
    'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator',
    'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door',
    'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower',
    'book', 'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer',
    'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman',
    'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt',
    'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan',
    'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag')


def label_lut() -> np.ndarray:
  """Raw ADE value -> train id: 0 -> 255, 1..150 -> 0..149, 255 -> 255."""
  mapping = {0: mmseg_rules.IGNORE_LABEL}
  mapping.update({k: k - 1 for k in range(1, NUM_CLASSES + 1)})
  return checks.make_lut(mapping, 256)


def generate_examples(inputs: registry.BuildInputs, split: str):
  """(stem, example) of `split`, sorted by file name, from the archive or its extracted folder."""
  [source] = inputs.sources
  subset, official_count = SPLITS[split]
  lut = label_lut()
  with archives.open_archive(source, inputs.extract) as archive:
    names = archive.names()
    images = archives.match_names(names, rf'(?:.*/)?images/{subset}/([^/]+)\.jpg')
    labels = archives.match_names(names, rf'(?:.*/)?annotations/{subset}/([^/]+)\.png')
    if not images:
      raise DatasetError(
          f'{source}: no images matching {FOLDER}/images/{subset}/*.jpg.\n'
          f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    checks.warn_count(logging, f'ade20k {split}', len(images), official_count)
    for stem in sorted(images):
      image_name = images[stem]
      if stem not in labels:
        raise DatasetError(
            f'{source}: {image_name} has no annotation '
            f'{FOLDER}/annotations/{subset}/{stem}.png.')
      image_bytes = archive.read(image_name)
      where = f'{source}:{labels[stem]}'
      raw = checks.decode_png_label(archive.read(labels[stem]), where)
      yield stem, checks.make_example(
          image_bytes, f'{source}:{image_name}', raw, where, lut,
          file_name=os.path.basename(image_name))


DATASET = registry.register(registry.Dataset(
    name='ade20k',
    class_names=CLASSES,
    mmseg_types={'ADE20KDataset': NUM_CLASSES},
    tfds=registry.TfdsBuild(
        version='1.0.0',
        release_notes={'1.0.0': 'Train ids 0..149, 255 = ignore (label 0 "other").'},
        description=__doc__,
        homepage='http://sceneparsing.csail.mit.edu/',
        citation=_CITATION,
        manual_download_instructions=MANUAL_DOWNLOAD_INSTRUCTIONS,
        sources=((ARCHIVE, FOLDER),),
        generate_examples=generate_examples),
))
