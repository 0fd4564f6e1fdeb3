"""The 'miou' evaluator: mIoU, mAcc, aAcc and per-class IoU / accuracy over the eval split, as
mmseg computes them; its mIoU picks the best checkpoint and fills final_metrics.json."""

import time
from typing import Any, Mapping

import numpy as np

from segvit_jax.evaluation import eval_loop
from segvit_jax.evaluation import metrics
from segvit_jax.evaluation import visualize
from segvit_jax.evaluation.evaluators import registry

PyTree = Any


@registry.register('miou')
class MiouEvaluator(registry.Evaluator):
  """The whole eval split through the run's inference settings (`context.spec`)."""

  def __init__(self, context: registry.Context):
    self._config, self._mesh = context.config, context.mesh
    self._num_classes = context.spec.num_classes
    self._names = visualize.classes(context.config).names
    self._step = eval_loop.make_eval_step(context.model, context.spec)

  def run(self, params: PyTree) -> dict[str, Any]:
    """`eval_loop.evaluate`'s dict plus 'seconds'."""
    start = time.time()
    result = eval_loop.evaluate(self._step, {'params': params},
                                eval_loop.eval_batches(self._config, self._mesh),
                                num_classes=self._num_classes,
                                class_names=self._names)
    result['seconds'] = time.time() - start
    return result

  def summary(self, result: Mapping[str, Any]) -> str:
    return (f'mIoU {result["miou"]:.4f}, mAcc {result["macc"]:.4f}, aAcc {result["aacc"]:.4f} '
            f'({result["seconds"]:.1f} s)')

  def scalars(self, result: Mapping[str, Any], prefix: str) -> dict[str, float]:
    scalars = metrics.to_scalars(dict(result), prefix=prefix)
    scalars[f'{prefix}seconds'] = float(result['seconds'])
    return scalars

  def checkpoint_metric(self, result: Mapping[str, Any]) -> float:
    return float(result['miou'])

  def final_metrics(self, result: Mapping[str, Any]) -> dict[str, Any]:
    """miou, macc, aacc and per_class_iou / per_class_acc as {class name: value}."""
    names = result['class_names']
    per_class = lambda key: dict(zip(names, (float(v) for v in np.asarray(result[key]))))
    return {'miou': float(result['miou']), 'macc': float(result['macc']),
            'aacc': float(result['aacc']), 'per_class_iou': per_class('per_class_iou'),
            'per_class_acc': per_class('per_class_acc')}

  def outputs(self, name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    return {f'{name}/{key}': float(result[key]) for key in ('miou', 'macc', 'aacc')}
