"""Tiny stand-ins for the official dataset archives, in their exact layouts.

Each writer takes lists of (name, image (H, W, 3) uint8, raw label) and writes the archive(s)
the builders expect into `manual_dir`, returning the written path(s). Images are JPEG bytes
from PIL; tests compare decoded images against tf.io.decode_jpeg of the same bytes.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image
import scipy.io


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=90)
  return buf.getvalue()


def png_bytes(label: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(label.astype(np.uint8), mode='L').save(buf, format='PNG')
  return buf.getvalue()


def mat_bytes(key: str, label: np.ndarray, dtype=np.uint16) -> bytes:
  buf = io.BytesIO()
  scipy.io.savemat(buf, {key: label.astype(dtype)}, do_compression=True)
  return buf.getvalue()


def _as_bytes(image) -> bytes:
  """Images may be given as arrays (encoded to JPEG) or as raw bytes (e.g. corrupt)."""
  return image if isinstance(image, bytes) else jpeg_bytes(image)


def _add_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def ade20k_zip(manual_dir, training, validation) -> str:
  """ADEChallengeData2016.zip; examples are (stem, image, label (H, W) raw 0..150)."""
  path = os.path.join(manual_dir, 'ADEChallengeData2016.zip')
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('ADEChallengeData2016/objectInfo150.txt', 'Idx\tRatio\tTrain\tVal\tName\n')
    for subset, examples in (('training', training), ('validation', validation)):
      for stem, image, label in examples:
        z.writestr(f'ADEChallengeData2016/images/{subset}/{stem}.jpg', _as_bytes(image))
        if label is not None:
          z.writestr(f'ADEChallengeData2016/annotations/{subset}/{stem}.png',
                     png_bytes(label))
  return path


def coco_stuff10k_zip(manual_dir, train, test) -> str:
  """cocostuff-10k-v1.1.zip; examples are (name, image, S (H, W) raw COCO-Stuff ids)."""
  path = os.path.join(manual_dir, 'cocostuff-10k-v1.1.zip')
  with zipfile.ZipFile(path, 'w') as z:
    for list_name, examples in (('train.txt', train), ('test.txt', test)):
      z.writestr(f'imageLists/{list_name}', ''.join(f'{n}\n' for n, _, _ in examples))
      for name, image, label in examples:
        z.writestr(f'images/{name}.jpg', _as_bytes(image))
        z.writestr(f'annotations/{name}.mat', mat_bytes('S', label))
    z.writestr('imageLists/all.txt', ''.join(f'{n}\n' for n, _, _ in train + test))
  return path


def pascal_context_archives(manual_dir, train, val) -> tuple[str, str]:
  """VOCtrainval_03-May-2010.tar and trainval.tar.gz; (id, image, LabelMap 0..459)."""
  voc = os.path.join(manual_dir, 'VOCtrainval_03-May-2010.tar')
  with tarfile.open(voc, 'w') as tar:
    root = 'VOCdevkit/VOC2010/'
    for list_name, examples in (('train', train), ('val', val)):
      _add_tar(tar, f'{root}ImageSets/Main/{list_name}.txt',
               ''.join(f'{i}\n' for i, _, _ in examples).encode())
      for image_id, image, _ in examples:
        _add_tar(tar, f'{root}JPEGImages/{image_id}.jpg', _as_bytes(image))
    # A segmentation list that must NOT be used for PASCAL-Context.
    _add_tar(tar, f'{root}ImageSets/Segmentation/train.txt', f'{train[0][0]}\n'.encode())
  context = os.path.join(manual_dir, 'trainval.tar.gz')
  with tarfile.open(context, 'w:gz') as tar:
    _add_tar(tar, 'labels.txt', b'1: accordion\n2: aeroplane\n')
    for image_id, _, label in train + val:
      _add_tar(tar, f'trainval/{image_id}.mat', mat_bytes('LabelMap', label))
  return voc, context


def mmseg_folder(root, layout: str, train, val, label_suffix: str = '.png') -> str:
  """An mmseg-prepared folder; layout 'generic' (img_dir/ann_dir) or 'ade20k'."""
  img_parent, ann_parent, splits = {
      'generic': ('img_dir', 'ann_dir', ('train', 'val')),
      'ade20k': ('images', 'annotations', ('training', 'validation')),
      'coco_stuff10k': ('images', 'annotations', ('train2014', 'test2014')),
  }[layout]
  for split, examples in zip(splits, (train, val)):
    os.makedirs(os.path.join(root, img_parent, split), exist_ok=True)
    os.makedirs(os.path.join(root, ann_parent, split), exist_ok=True)
    for stem, image, label in examples:
      with open(os.path.join(root, img_parent, split, f'{stem}.jpg'), 'wb') as f:
        f.write(_as_bytes(image))
      with open(os.path.join(root, ann_parent, split, f'{stem}{label_suffix}'), 'wb') as f:
        f.write(png_bytes(label))
  return root
