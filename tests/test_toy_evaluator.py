"""An evaluator added from outside segvit_jax: registered here, listed in config.evals, run by the
trainer at the steps its entry asks for, its result in final_metrics.json."""

import json
import os

import jax
import numpy as np

from segvit_jax.evaluation import eval_loop
from segvit_jax.evaluation.evaluators import registry
from segvit_jax.training import loop

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top


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


def test_a_registered_evaluator_runs_when_due_and_lands_in_final_metrics(tmp_path):
  # 4 steps; the toy every 2, the built-in evaluators off. The eval batch of 4 sees 4 of the 6
  # validation images.
  config = tiny_runs.tiny_config(num_train_steps=4, checkpoint_every_steps=4, log_every_steps=2)
  config.evals.toy = dict(type='toy_param_norm', every_steps=2, num_batches=1)
  workdir = str(tmp_path / 'run')
  result = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  ran = {r['step']: r['toy/param_norm'] for r in records if 'toy/param_norm' in r}
  assert sorted(ran) == [2, 4]
  assert ran[2] != ran[4]  # evaluated on the parameters of its step
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 4
  assert final['toy'] == {'param_norm': ran[4], 'examples': 4}
  assert 'miou' not in final  # the mIoU evaluator was off
  assert result['toy/param_norm'] == ran[4]
  assert result['metrics_file'] == os.path.join(workdir, 'final_metrics.json')
