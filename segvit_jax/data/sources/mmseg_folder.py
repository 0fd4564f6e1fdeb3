"""A data folder already prepared for mmsegmentation, read directly with tf.data.

Recognised layouts of `dataset_config.folder` (checked in this order):
  generic   img_dir/{train,val}/*.jpg|png          ann_dir/{train,val}/<stem>.png
  ADE20K    images/{training,validation}/*.jpg     annotations/{training,validation}/<stem>.png
            (the extracted ADEChallengeData2016/ folder)
  COCO-10K  images/{train2014,test2014}/*.jpg      annotations/{...}/<stem>_labelTrainIds.png
            (mmseg's tools/convert_datasets/coco_stuff10k.py output)
  PC        JPEGImages/*.jpg  SegmentationClassContext/<id>.png
            ImageSets/SegmentationContext/{train,val}.txt  (VOCdevkit/VOC2010 after mmseg's
            pascal_context.py converter; a VOCdevkit/ folder is accepted as well)
Annotation files are `<image stem>.png` or `<image stem>_labelTrainIds.png`.

Labels are read as stored (mmseg's label space) and mapped in the graph with
`dataset_config.reduce_zero_label` as mmseg does it: 0 -> 255, k -> k - 1, 255 stays 255.
Set it True for ADE20K, COCO-Stuff-10K and PASCAL-Context-59; False for PASCAL-Context-60.
Values >= num_classes (other than 255) and image/label size mismatches fail in the pipeline
with the file name; `validate()` checks a whole folder up front (decodes every file).
"""

from __future__ import annotations

import dataclasses
import os

from PIL import Image
import tensorflow as tf

from segvit_jax.data import augment
from segvit_jax.data import mmseg_rules
from segvit_jax.data.sources import DatasetError
from segvit_jax.data.sources import checks
from segvit_jax.data.sources import even_range

_IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
_LABEL_SUFFIXES = ('.png', '_labelTrainIds.png')
_SPLIT_DIRS = {'train': ('train', 'training', 'train2014'),
               'validation': ('val', 'validation', 'test2014')}
_LAYOUTS_TEXT = (
    'img_dir/{train,val} + ann_dir/{train,val} (generic mmseg layout), '
    'images/{training,validation} + annotations/{training,validation} (ADE20K), '
    'images/{train2014,test2014} + annotations/{train2014,test2014} (COCO-Stuff-10K), or '
    'VOC2010/JPEGImages + SegmentationClassContext + ImageSets/SegmentationContext/'
    '{train,val}.txt (PASCAL-Context)')


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Matched (image, annotation) file paths of one split, sorted by image name."""
  images: tuple[str, ...]
  labels: tuple[str, ...]


def _split_dir(parent: str, split: str) -> str | None:
  for d in _SPLIT_DIRS[split]:
    p = os.path.join(parent, d)
    if os.path.isdir(p):
      return p
  return None


def _label_for(image_path: str, ann_dir: str) -> str | None:
  stem = os.path.splitext(os.path.basename(image_path))[0]
  for suffix in _LABEL_SUFFIXES:
    p = os.path.join(ann_dir, stem + suffix)
    if os.path.exists(p):
      return p
  return None


def _pair_dir(img_dir: str, ann_dir: str) -> Pairs:
  images = sorted(os.path.join(img_dir, f) for f in os.listdir(img_dir)
                  if f.lower().endswith(_IMAGE_EXTS) and not f.startswith('._'))
  if not images:
    raise DatasetError(f'{img_dir}: no images (*.jpg, *.png).')
  labels = []
  for im in images:
    lab = _label_for(im, ann_dir)
    if lab is None:
      stem = os.path.splitext(os.path.basename(im))[0]
      raise DatasetError(
          f'{im}: no annotation {os.path.join(ann_dir, stem)}'
          f'{{{",".join(_LABEL_SUFFIXES)}}}.')
    labels.append(lab)
  return Pairs(tuple(images), tuple(labels))


def _pascal_context_pairs(voc: str, split: str) -> Pairs:
  list_name = {'train': 'train', 'validation': 'val'}[split]
  list_path = os.path.join(voc, 'ImageSets', 'SegmentationContext', f'{list_name}.txt')
  if not os.path.exists(list_path):
    raise DatasetError(f'{list_path}: split list missing.')
  with open(list_path) as f:
    ids = sorted(line.split()[0] for line in f if line.strip())
  images, labels = [], []
  for i in ids:
    im = os.path.join(voc, 'JPEGImages', f'{i}.jpg')
    lab = _label_for(im, os.path.join(voc, 'SegmentationClassContext'))
    if not os.path.exists(im):
      raise DatasetError(f'{im}: listed in {list_path} but missing.')
    if lab is None:
      raise DatasetError(
          f'{im}: no annotation in {os.path.join(voc, "SegmentationClassContext")}.')
    images.append(im)
    labels.append(lab)
  return Pairs(tuple(images), tuple(labels))


def find_pairs(folder: str, split: str) -> Pairs:
  """Lists the (image, annotation) pairs of `split` ('train'/'validation') in `folder`."""
  if split not in _SPLIT_DIRS:
    raise ValueError(f"mmseg_folder split must be 'train' or 'validation', got {split!r}.")
  if not folder or not os.path.isdir(folder):
    raise DatasetError(
        f'config.dataset.folder={folder!r} is not a folder. Expected one of: '
        f'{_LAYOUTS_TEXT}.')
  for img_parent, ann_parent in (('img_dir', 'ann_dir'), ('images', 'annotations')):
    img_root = os.path.join(folder, img_parent)
    ann_root = os.path.join(folder, ann_parent)
    if os.path.isdir(img_root) and os.path.isdir(ann_root):
      img_dir, ann_dir = _split_dir(img_root, split), _split_dir(ann_root, split)
      if img_dir is None or ann_dir is None:
        raise DatasetError(
            f'{folder}: no {split} folder; expected one of {_SPLIT_DIRS[split]} under both '
            f'{img_root} and {ann_root}.')
      return _pair_dir(img_dir, ann_dir)
  for voc in (folder, os.path.join(folder, 'VOC2010')):
    if os.path.isdir(os.path.join(voc, 'SegmentationClassContext')):
      return _pascal_context_pairs(voc, split)
  raise DatasetError(
      f'{folder}: not an mmseg data folder. Expected one of: {_LAYOUTS_TEXT}.')


def _check_label_format(path: str) -> None:
  """Label maps hold class indices in one 8-bit channel: grey or palette PNGs (mmseg reads both)."""
  with Image.open(path) as im:
    if im.format != 'PNG' or im.mode not in ('L', 'P'):
      raise DatasetError(
          f'{path}: label maps must be 8-bit single-channel (grey or palette) PNGs holding class '
          f'indices, got {im.format} mode {im.mode}. Convert with '
          "PIL: Image.fromarray(np.asarray(Image.open(p)).astype(np.uint8)).save(p).")


def reduce_zero_label(label: tf.Tensor) -> tf.Tensor:
  """mmseg's reduce_zero_label on uint8 labels: 0 -> 255, k -> k - 1, 255 stays 255."""
  ignore = tf.constant(mmseg_rules.IGNORE_LABEL, tf.uint8)
  return tf.where((label == 0) | (label == ignore), ignore, label - 1)


def _decode(image_path, label_path, *, num_classes: int, reduce_zero: bool):
  image = augment.decode_image(tf.io.read_file(image_path))
  label = augment.decode_label(tf.io.read_file(label_path))
  if reduce_zero:
    label = reduce_zero_label(label)
  # Name the file when the data is inconsistent instead of failing later in the loss.
  valid = tf.where(label == mmseg_rules.IGNORE_LABEL, tf.constant(0, tf.uint8), label)
  same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)))
  in_range = tf.cast(tf.reduce_max(valid), tf.int32) < num_classes
  checks = [
      tf.debugging.Assert(same_size, [
          'image and label sizes differ:', image_path, tf.shape(image)[:2], label_path,
          tf.shape(label)]),
      tf.debugging.Assert(in_range, [
          f'label value out of range [0, {num_classes}) (and not 255):', label_path,
          tf.reduce_max(valid)]),
  ]
  with tf.control_dependencies(checks):
    label = tf.identity(label)
  return {'image': image, 'label': label,
          'file_name': tf.strings.split(image_path, os.sep)[-1]}


def source(dataset_config, split: str, shard_index: int = 0,
           num_shards: int = 1) -> tf.data.Dataset:
  """Examples of `split` from `dataset_config.folder`, this host's contiguous block."""
  pairs = find_pairs(dataset_config.folder, split)
  if pairs.labels:
    _check_label_format(pairs.labels[0])
  start, stop = even_range(len(pairs.images), shard_index, num_shards)
  ds = tf.data.Dataset.from_tensor_slices(
      (tf.constant(pairs.images[start:stop], tf.string, shape=[stop - start]),
       tf.constant(pairs.labels[start:stop], tf.string, shape=[stop - start])))
  num_classes = int(dataset_config.num_classes)
  reduce_zero = bool(dataset_config.reduce_zero_label)
  return ds.map(
      lambda image, label: _decode(image, label, num_classes=num_classes, reduce_zero=reduce_zero),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def num_examples(dataset_config, split: str) -> int:
  return len(find_pairs(dataset_config.folder, split).images)


def validate(folder: str, num_classes: int, reduce_zero: bool,
             splits=('train', 'validation'), log=print) -> dict[str, int]:
  """Decodes every image and label of `folder`; raises DatasetError naming a bad file.

  Returns the number of examples per split.
  """
  if reduce_zero:
    ignore = mmseg_rules.IGNORE_LABEL
    lut = checks.make_lut({0: ignore, **{k: k - 1 for k in range(1, num_classes + 1)}}, 256)
  else:
    lut = checks.make_lut({k: k for k in range(num_classes)}, 256)
  counts = {}
  for split in splits:
    pairs = find_pairs(folder, split)
    for n, (im, lab) in enumerate(zip(pairs.images, pairs.labels)):
      _check_label_format(lab)
      with open(im, 'rb') as f:
        data = f.read()
      hw = checks.check_image(data, im)
      with open(lab, 'rb') as f:
        label = checks.apply_lut(checks.decode_png_label(f.read(), lab), lut, lab)
      checks.check_same_size(hw, label, im, lab, checks.exif_swaps_sides(data))
      if (n + 1) % 500 == 0:
        log(f'{split}: checked {n + 1}/{len(pairs.images)}')
    counts[split] = len(pairs.images)
    log(f'{split}: {counts[split]} examples OK')
  return counts
