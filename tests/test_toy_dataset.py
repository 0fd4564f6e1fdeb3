"""A dataset added from outside segvit_jax: declared and registered here (class names, palette,
in-memory examples), selected by config.dataset, trained and evaluated on by the trainer, its class
names in final_metrics.json."""

import json
import os

import jax
import numpy as np

from segvit_jax.data import datasets
from segvit_jax.evaluation import visualize
from segvit_jax.training import train

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

CLASSES = ('sea', 'island', 'reef')
PALETTE = np.array([[0, 60, 200], [240, 200, 80], [250, 120, 170]], np.uint8)
SIZES = {'train': 8, 'validation': 4}
SIDE = 32
loaded = []  # the splits the run read


def _split(split):
  """(images (N, 32, 32, 3) uint8, labels (N, 32, 32) uint8): an island and a reef at sea."""
  rng = np.random.default_rng(len(split))
  labels = np.zeros((SIZES[split], SIDE, SIDE), np.uint8)
  for label in labels:
    y, x = rng.integers(4, 20, 2)
    label[y:y + 10, x:x + 10] = 1
    label[(y + 14) % SIDE, :] = 2
  noise = rng.integers(0, 30, labels.shape + (3,))
  images = (PALETTE[labels].astype(np.int64) * 0.8 + noise).astype(np.uint8)
  return images, labels


def _num_examples(dataset_config, split):
  del dataset_config
  return SIZES[split]


def _load(dataset_config, split):
  del dataset_config
  loaded.append(split)
  return _split(split)


TOY = datasets.register(datasets.Dataset(
    name='toy_islands', class_names=CLASSES, palette=PALETTE,
    in_memory=datasets.InMemorySource(num_examples=_num_examples, load=_load)))


def test_a_registered_dataset_is_trained_and_evaluated_on(tmp_path):
  # configs/synthetic.py switched to the toy: 2 steps, the mIoU evaluation after the last.
  config = tiny_runs.tiny_config(num_train_steps=2, checkpoint_every_steps=2,
                                 evals__val__every_steps=-1)
  config.dataset.name = config.dataset.source = 'toy_islands'
  config.dataset.num_classes = config.model.num_classes = len(CLASSES)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  assert set(loaded) == {'train', 'validation'}
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 2
  assert list(final['per_class_iou']) == list(CLASSES)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = set().union(*(json.loads(line) for line in f))
  assert {f'val/iou/{name}' for name in CLASSES} <= logged
  colors = visualize.classes(config).colors  # what the figure and predict draw with
  np.testing.assert_array_equal(colors, PALETTE)
