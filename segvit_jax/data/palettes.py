"""Class names and colours of the datasets, indexed by train id (0..K-1).

No TensorFlow here: prediction and visualisation code imports this module on its own.
The class orders are those of the label maps the builders write, which are mmseg's:
ADE20K ids 1..150 -> 0..149; COCO-Stuff-10K used COCO ids in increasing order (80 things,
then 91 stuff); PASCAL-Context the 59 classes in increasing order of their id among the
459 PASCAL-Context labels (which is alphabetical), after 'background' in the 60-class set.
"""

from __future__ import annotations

import numpy as np

IGNORE_COLOR = (0, 0, 0)  # palettes below never use pure black for a class

ADE20K_CLASSES = (
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

COCO_STUFF_CLASSES = (
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

PASCAL_CONTEXT_59_CLASSES = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book',
    'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food',
    'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse',
    'person', 'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves',
    'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck',
    'tvmonitor', 'wall', 'water', 'window', 'wood')

PASCAL_CONTEXT_60_CLASSES = ('background',) + PASCAL_CONTEXT_59_CLASSES


# Synthetic foreground class c (1..K-1) = texture c-1 on shape c-1; class 0 = background.
# `segvit_jax.data.datasets.synthetic` renders them under these names.
SYNTHETIC_TEXTURES = ('h-stripes', 'v-stripes', 'checker', 'diag-stripes', 'dots',
                      'antidiag-stripes', 'crosshatch', 'rings')
SYNTHETIC_SHAPES = ('circle', 'square', 'triangle', 'diamond', 'ellipse', 'hexagon', 'bar',
                    'cross')


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
  """Names of the synthetic classes: 'background', then '<texture> <shape>'."""
  if not 2 <= num_classes <= len(SYNTHETIC_TEXTURES) + 1:
    raise ValueError(f'synthetic num_classes must be in [2, {len(SYNTHETIC_TEXTURES) + 1}], '
                     f'got {num_classes}.')
  return ('background',) + tuple(
      f'{SYNTHETIC_TEXTURES[i]} {SYNTHETIC_SHAPES[i]}' for i in range(num_classes - 1))


def class_names(name: str, num_classes: int | None = None) -> tuple[str, ...]:
  """The class names of dataset `name`, indexed by train id.

  Args:
    name: 'ade20k', 'coco_stuff10k', 'pascal_context' (60, or 59 with num_classes=59),
      'pascal_context/59', 'pascal_context/60' or 'synthetic' (num_classes required).
    num_classes: checked against the dataset when given.
  """
  base, _, variant = name.partition('/')
  if base == 'synthetic':
    return synthetic_class_names(num_classes or 5)
  if base == 'ade20k':
    names = ADE20K_CLASSES
  elif base in ('coco_stuff10k', 'coco_stuff'):
    names = COCO_STUFF_CLASSES
  elif base == 'pascal_context':
    k = int(variant) if variant else (num_classes or 60)
    if k not in (59, 60):
      raise ValueError(f'PASCAL-Context has 59 or 60 classes, got {k}.')
    names = PASCAL_CONTEXT_59_CLASSES if k == 59 else PASCAL_CONTEXT_60_CLASSES
  else:
    raise ValueError(f'Unknown dataset {name!r}: expected ade20k, coco_stuff10k, '
                     'pascal_context[/59|/60] or synthetic.')
  if num_classes is not None and num_classes != len(names):
    raise ValueError(f'{name} has {len(names)} classes, the config says {num_classes}.')
  return names


def color_table(num_colors: int) -> np.ndarray:
  """(num_colors, 3) uint8 distinct colours from the bit-interleaving PASCAL VOC scheme.

  Entry k is the VOC colour of index k + 1, so no class is black (black = ignore).
  """
  out = np.zeros((num_colors, 3), np.uint8)
  for k in range(num_colors):
    c, rgb = k + 1, [0, 0, 0]
    for shift in range(7, -1, -1):
      for ch in range(3):
        rgb[ch] |= ((c >> ch) & 1) << shift
      c >>= 3
    out[k] = rgb
  return out


def palette(name: str, num_classes: int | None = None) -> np.ndarray:
  """(K, 3) uint8 RGB colour of each class of dataset `name` (see class_names)."""
  return color_table(len(class_names(name, num_classes)))


def colorize(label: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """(H, W) int label map -> (H, W, 3) uint8 image; 255 (ignore) becomes IGNORE_COLOR."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:] = IGNORE_COLOR
  lut[:len(colors)] = colors
  return lut[np.asarray(label).astype(np.int64).clip(0, 255)]
