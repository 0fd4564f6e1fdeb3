"""Plug-in points used from outside segvit_jax, as a user's own code would: a dataset (class names,
palette, in-memory examples) and an evaluator, both declared and registered in this file alone,
selected by config.dataset and config.evals, trained and evaluated on by the trainer."""

import json
import os

import jax
import numpy as np

from segvit_jax.data import datasets
from segvit_jax.evaluation import eval_loop
from segvit_jax.evaluation import visualize
from segvit_jax.evaluation.evaluators import registry
from segvit_jax.training import loop

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


@registry.register('toy_param_norm')
class ParamNormEvaluator(registry.Evaluator):
  """The parameters' global L2 norm, and how many eval examples the first batches hold."""

  def __init__(self, context: registry.Context, *, num_batches: int = 1):
    self._config, self._mesh, self._num_batches = context.config, context.mesh, num_batches

  def run(self, params):
    examples = 0
    for i, batch in enumerate(eval_loop.eval_batches(self._config, self._mesh)):
      if i == self._num_batches:
        break
      examples += int(eval_loop.to_host(batch['valid']).sum())
    squares = [np.sum(np.square(eval_loop.to_host(x).astype(np.float64)))
               for x in jax.tree.leaves(params)]
    norm = float(np.sqrt(sum(squares)))
    return {'param_norm': norm, 'examples': examples}

  def summary(self, result):
    return f'|params| {result["param_norm"]:.3f} ({result["examples"]} eval examples seen)'

  def scalars(self, result, prefix):
    return {f'{prefix}param_norm': result['param_norm']}

  def final_metrics(self, result):
    return dict(result)

  def outputs(self, name, result):
    return {f'{name}/param_norm': result['param_norm']}


def test_a_registered_dataset_and_evaluator_train_and_evaluate(tmp_path):
  # configs/synthetic.py switched to the toy dataset: 4 steps, the toy evaluator every 2, the
  # mIoU evaluation after the last. The eval batch of 4 holds the 4 validation images.
  config = tiny_runs.tiny_config(num_train_steps=4, checkpoint_every_steps=4, log_every_steps=2,
                                 evals__val__every_steps=-1)
  config.dataset.name = config.dataset.source = 'toy_islands'
  config.dataset.num_classes = config.model.num_classes = len(CLASSES)
  config.evals.toy = dict(type='toy_param_norm', every_steps=2, num_batches=1)
  workdir = str(tmp_path / 'run')
  result = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  # The dataset: both splits read, its class names in the metrics, its palette in the figures.
  assert set(loaded) == {'train', 'validation'}
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 4
  assert list(final['per_class_iou']) == list(CLASSES)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert {f'val/iou/{name}' for name in CLASSES} <= set().union(*records)
  np.testing.assert_array_equal(visualize.classes(config).colors, PALETTE)

  # The evaluator: run at the steps its entry asks for, on that step's parameters; its result
  # under its entry's name beside the mIoU evaluator's (which picks the best checkpoint).
  ran = {r['step']: r['toy/param_norm'] for r in records if 'toy/param_norm' in r}
  assert sorted(ran) == [2, 4]
  assert ran[2] != ran[4]
  assert final['toy'] == {'param_norm': ran[4], 'examples': SIZES['validation']}
  assert 0 <= final['miou'] <= 1
  assert result['toy/param_norm'] == ran[4]
  assert result['metrics_file'] == os.path.join(workdir, 'final_metrics.json')
