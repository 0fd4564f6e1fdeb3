"""The 'figure' evaluator: the first eval examples drawn as rows image | ground truth |
prediction, with a legend, to WORKDIR/<prefix>predictions.png."""

import io
from typing import Any, Mapping

import jax
import numpy as np
from PIL import Image

from segvit_jax import distributed
from segvit_jax import fileio
from segvit_jax.evaluation import eval_loop
from segvit_jax.evaluation import inference
from segvit_jax.evaluation import visualize
from segvit_jax.evaluation.evaluators import registry

PyTree = Any


@registry.register('figure')
class FigureEvaluator(registry.Evaluator):
  """Predicts the first `num_images` valid eval examples with the run's inference settings and
  draws them (process 0 writes the PNG)."""

  def __init__(self, context: registry.Context, *, num_images: int = 4):
    self._config, self._mesh, self._num = context.config, context.mesh, int(num_images)
    self._spec = spec = context.spec
    self.path = context.path('predictions.png')
    self._classes = visualize.classes(context.config)
    model = context.model
    predict = lambda params, batch: inference.predict(
        lambda x: model.apply({'params': params}, x, train=False), batch, spec)
    self._predict = distributed.compiled_together(jax.jit(predict), "the figure's predictions")

  def _rows(self, params: PyTree) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image (lh, lw, 3) uint8 at label size, label (lh, lw), prediction (lh, lw)) per example."""
    mean, std = np.asarray(self._spec.mean, np.float32), np.asarray(self._spec.std, np.float32)
    rows = []
    for batch in eval_loop.eval_batches(self._config, self._mesh):
      pred = eval_loop.to_host(self._predict(params, batch))
      host = {key: eval_loop.to_host(v) for key, v in batch.items()}
      for i in np.flatnonzero(host['valid'])[:self._num - len(rows)]:
        (h, w), (lh, lw) = host['image_size'][i], host['label_size'][i]
        image = np.clip(host['image'][i, :h, :w] * std + mean, 0, 255).astype(np.uint8)
        image = np.asarray(Image.fromarray(image).resize((int(lw), int(lh)), Image.BILINEAR))
        rows.append((image, host['label'][i, :lh, :lw], pred[i, :lh, :lw]))
      if len(rows) >= self._num:
        break
    return rows

  def run(self, params: PyTree) -> dict[str, Any]:
    rows = self._rows(params)
    if rows and jax.process_index() == 0:
      figure = visualize.predictions_figure(rows, *self._classes)
      png = io.BytesIO()
      figure.save(png, format='PNG')
      fileio.replace_file(self.path, png.getvalue())
    return {'path': self.path, 'images': len(rows)}

  def summary(self, result: Mapping[str, Any]) -> str:
    return f'{result["images"]} predictions drawn to {result["path"]}'

  def outputs(self, name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    del name
    return {'figure_file': result['path']} if result['images'] else {}
