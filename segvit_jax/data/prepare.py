r"""Builds a TFDS dataset from the official files, or checks an mmseg data folder.

  python -m segvit_jax.data.prepare ade20k --manual_dir=~/downloads --data_dir=~/tfds
  python -m segvit_jax.data.prepare coco_stuff10k --manual_dir=... --data_dir=...
  python -m segvit_jax.data.prepare pascal_context --manual_dir=... --data_dir=...
      (both configs; or pascal_context/59, pascal_context/60)
  python -m segvit_jax.data.prepare mmseg_folder --folder=data/ade/ADEChallengeData2016 \
      --num_classes=150 --reduce_zero_label

NAME is a dataset declared with a TFDS build (`segvit_jax.data.datasets`), 'NAME/CONFIG' for
one of its builder configs, or 'mmseg_folder'. The manual directory holds the downloads (see each
dataset's instructions, printed when a file is missing). Nothing is downloaded. Progress bars show
the examples written per split; a corrupt image, a size mismatch or an out-of-range label stops
the build with the file name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from segvit_jax import cli
from segvit_jax import errors
from segvit_jax.data import datasets
from segvit_jax.data.sources import DatasetError


def names() -> list[str]:
  """What the CLI builds: every declared TFDS build, each of its configs, 'mmseg_folder'."""
  out = []
  for dataset in datasets.all_datasets():
    if dataset.tfds is not None:
      out.append(dataset.name)
      if dataset.tfds.configs:
        out.extend(dataset.tfds_names())
  return out + ['mmseg_folder']


def _parse(argv):
  p = argparse.ArgumentParser(
      prog='python -m segvit_jax.data.prepare',
      description=__doc__.split('\n')[0])
  p.add_argument('name', choices=names())
  p.add_argument('--manual_dir', default=None,
                 help='folder with the official archives (default <data_dir>/downloads/manual)')
  p.add_argument('--data_dir', default=None,
                 help='TFDS data dir to write (default $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  p.add_argument('--overwrite', action='store_true',
                 help='rebuild even when a build already exists')
  p.add_argument('--folder', default=None, help='mmseg_folder: the folder to check')
  p.add_argument('--num_classes', type=int, default=None, help='mmseg_folder: K')
  p.add_argument('--reduce_zero_label', action='store_true',
                 help='mmseg_folder: labels 0 = ignore, 1..K = classes')
  return p.parse_args(argv)


def _expand(path):
  return os.path.abspath(os.path.expanduser(path)) if path else None


def build(name: str, manual_dir: str | None, data_dir: str | None,
          overwrite: bool = False, log=print) -> dict[str, dict[str, int]]:
  """Prepares `name` (every config of a dataset that has several); returns {full name: split
  counts}."""
  tfds = errors.import_tensorflow_module('tensorflow_datasets', f'Building {name}')
  tfds_builder = errors.import_tensorflow_module('segvit_jax.data.sources.tfds_builder',
                                                 f'Building {name}')
  tfds_builder.register_builders()

  dataset = datasets.find(name)
  configs = dataset.tfds.configs if dataset is not None and dataset.tfds is not None else ()
  full_names = [f'{name}/{c.name}' for c in configs] or [name]
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  results = {}
  for full in full_names:
    builder = tfds.builder(full, data_dir=data_dir)
    log(f'[{full}] building into {builder.data_dir}'
        + (f' from {manual_dir}' if manual_dir else ''))
    start = time.time()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, download_mode=mode))
    counts = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
    log(f'[{full}] done in {time.time() - start:.0f} s: '
        + ', '.join(f'{s} {n}' for s, n in sorted(counts.items())))
    results[full] = counts
  return results


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    if args.name == 'mmseg_folder':
      mmseg_folder = errors.import_tensorflow_module('segvit_jax.data.sources.mmseg_folder',
                                                     'Checking an mmseg folder')
      if not args.folder or args.num_classes is None:
        raise DatasetError('mmseg_folder needs --folder=PATH and --num_classes=K.')
      mmseg_folder.validate(_expand(args.folder), args.num_classes, args.reduce_zero_label)
    else:
      build(args.name, _expand(args.manual_dir), _expand(args.data_dir), args.overwrite)
  except errors.UserError as e:  # a DatasetError too
    cli.print_error(str(e))
    return 1
  return 0


def run():
  """The `segvit-prepare` console script."""
  sys.exit(main())


if __name__ == '__main__':
  run()
