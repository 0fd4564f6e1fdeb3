r"""Train input pipeline throughput (images/s) on ADE20K-sized JPEGs.

Runs `segvit_jax.data.input_pipeline.create_train_dataset` on the project's mmseg-folder source
(`segvit_jax.data.sources.reader.get_source`, source 'mmseg_folder': JPEG + PNG decoding,
reduce_zero_label) and the whole official augmentation (resize with the ratio range,
cat_max_ratio crop, flip, photometric distortion, normalise, pad, batch), and prints images per
second after a warm-up.

  python -m bench.input_pipeline                                    # 64 generated pairs
  python -m bench.input_pipeline --folder=/data/ADEChallengeData2016 \
      --config=configs/ade20k_large.py

(from the repository root, so that its `segvit_jax` is the one imported).

--folder is an ADE20K-layout folder (images/training/*.jpg, annotations/training/*.png, raw ADE
labels 0..150). Without it, pairs are generated in a temporary folder: smooth photograph-like
JPEGs (quality 90, about 90 KB) of common ADE20K sizes (683x512, 512x683, 512x512, 768x512,
512x384, 640x480) with label maps of 6-20 Voronoi regions of random classes 1..150.
The figure depends on what else runs on the machine: the CPU time per image is printed too.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image

from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from segvit_jax.data.sources import reader  # pylint: disable=g-import-not-at-top
from segvit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

ADE_SIZES = ((512, 683), (683, 512), (512, 512), (512, 768), (384, 512), (480, 640))  # (h, w)


def _smooth_noise(rng, h, w, cells):
  """Bilinearly upsampled random grid: large smooth blobs, like photo content."""
  grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
  return np.asarray(Image.fromarray(grid.astype(np.uint8)).resize((w, h), Image.BILINEAR),
                    np.float32)


def generate_pairs(folder: str, n: int, seed: int = 0) -> None:
  """Writes n ADE-sized pairs in the ADE20K layout under `folder`."""
  image_dir = os.path.join(folder, 'images', 'training')
  label_dir = os.path.join(folder, 'annotations', 'training')
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(label_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = ADE_SIZES[i % len(ADE_SIZES)]
    img = 0.6 * _smooth_noise(rng, h, w, 6) + 0.3 * _smooth_noise(rng, h, w, 40)
    img += rng.normal(0, 6, (h, w, 3))  # texture so the JPEG is not trivially small
    name = f'ADE_train_{i:08d}'
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(image_dir, name + '.jpg'), quality=90)
    k = int(rng.integers(6, 21))
    centres = rng.uniform(0, 1, (k, 2)) * (h, w)
    classes = rng.integers(1, 151, k).astype(np.uint8)  # raw ADE ids; 0 ("other") is ignore
    yy, xx = np.mgrid[:h, :w]
    d = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    Image.fromarray(classes[np.argmin(d, -1)]).save(os.path.join(label_dir, name + '.png'))


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main():
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(root, 'configs', 'ade20k_base.py'))
  parser.add_argument('--folder', default='', help='ADE20K-layout folder; empty: generate pairs')
  parser.add_argument('--num_images', type=int, default=64, help='pairs to generate')
  parser.add_argument('--batch_size', type=int, default=8, help='host batch size')
  parser.add_argument('--warmup_batches', type=int, default=8)
  parser.add_argument('--batches', type=int, default=40)
  args = parser.parse_args()

  config = config_lib.load_config(args.config)
  config.batch_size = args.batch_size
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder
    if not folder:
      folder = tmp
      t = time.time()
      generate_pairs(folder, args.num_images)
      print(f'generated {args.num_images} ADE-sized pairs in {time.time() - t:.1f} s')
    d = config.dataset
    d.source, d.folder = 'mmseg_folder', folder
    n = reader.num_examples(d, 'train')
    ds = input_pipeline.create_train_dataset(config, process_index=0, process_count=1)
    it = ds.as_numpy_iterator()
    for _ in range(args.warmup_batches):
      batch = next(it)
    t, cpu = time.time(), _cpu_seconds()
    for _ in range(args.batches):
      batch = next(it)
    dt, cpu = time.time() - t, _cpu_seconds() - cpu
  images = args.batches * args.batch_size
  print(f'config {os.path.basename(args.config)}: crop {tuple(config.dataset.crop_size)}, '
        f'{n} source images, batch {args.batch_size}, {os.cpu_count()} CPUs visible, '
        f'load average {os.getloadavg()[0]:.2f}')
  print('batch shapes: ' + ', '.join(f'{k} {v.shape} {v.dtype}' for k, v in batch.items()))
  print(f'{images / dt:.1f} images/s ({images} images in {dt:.2f} s after '
        f'{args.warmup_batches} warm-up batches)')
  # On a shared machine wall time depends on the other load; CPU time per image does much less.
  print(f'CPU time {1000 * cpu / images:.1f} ms per image (user + sys, all threads): '
        f'{2 * images / cpu:.1f} images/s if 2 cores were this process\'s alone')


if __name__ == '__main__':
  if not __package__:  # `python bench/input_pipeline.py` would import another tree's segvit_jax
    sys.exit('Run from the repository root: python -m bench.input_pipeline')
  main()
