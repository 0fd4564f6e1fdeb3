"""What a run evaluates: small objects listed in `config.evals`, each `run(params) -> result`.

    config.evals.val = dict(type='miou', every_steps=4000)     # mIoU & co. over the eval split
    config.evals.figure = dict(type='figure', every_steps=-1, num_images=4)  # predictions.png

`every_steps`: N > 0 runs after every N-th step and after the last one; -1 only after the last
step; 0 never during training (--mode=eval runs every entry once). Scalars go to the metric
writers prefixed by the entry's name ('val/miou', 'val/iou/<class>'); the first 'miou' entry's
mIoU picks the best checkpoint and fills final_metrics.json. Inference follows `config.eval`
(sliding window or whole image, TTA).
"""

import dataclasses
import io
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from segvit_jax import cli
from segvit_jax import distributed
from segvit_jax.evaluation import evaluate
from segvit_jax import fileio
from segvit_jax.evaluation import metrics as metrics_lib
from segvit_jax.evaluation import visualize
from segvit_jax.errors import UserError

PyTree = Any


def eval_batches(config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """The eval split as global batches (this process's shard of every batch), each padded up to
  a multiple of the mesh's batch shards."""
  from segvit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.create_eval_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      batch_shards=mesh.shape['data'] * mesh.shape['fsdp'])
  return input_pipeline.global_batches(ds, mesh)


def _inference_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = config.dataset
  return dict(test_img_scale=tuple(d.test_img_scale), test_min_size=int(d.test_min_size))


def make_eval_step(model, config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """`evaluate.make_eval_step` for the run's inference settings: (variables, batch, conf) ->
  conf."""
  return evaluate.make_eval_step(model, config.eval, config.dataset.num_classes,
                                 **_inference_kwargs(config))


class MiouEvaluator:
  """mIoU, mAcc, aAcc and per-class IoU / accuracy over the eval split, as mmseg computes them."""

  def __init__(self, model, config: ml_collections.ConfigDict, mesh: Mesh):
    self._config, self._mesh = config, mesh
    self._names = visualize.classes(config).names
    self._step = make_eval_step(model, config)

  def run(self, params: PyTree) -> dict[str, Any]:
    """`evaluate.evaluate`'s dict plus 'seconds'."""
    start = time.time()
    result = evaluate.evaluate(self._step, {'params': params},
                               eval_batches(self._config, self._mesh),
                               num_classes=self._config.dataset.num_classes,
                               class_names=self._names)
    result['seconds'] = time.time() - start
    return result

  @staticmethod
  def scalars(result: Mapping[str, Any], prefix: str) -> dict[str, float]:
    scalars = metrics_lib.to_scalars(dict(result), prefix=prefix)
    scalars[f'{prefix}seconds'] = float(result['seconds'])
    return scalars

  @staticmethod
  def summary(result: Mapping[str, Any]) -> str:
    return (f'mIoU {result["miou"]:.4f}, mAcc {result["macc"]:.4f}, aAcc {result["aacc"]:.4f} '
            f'({result["seconds"]:.1f} s)')


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class FigureEvaluator:
  """Draws the first `num_images` eval examples as rows image | ground truth | prediction, with
  a legend, to a PNG in the workdir (process 0 writes it)."""

  def __init__(self, model, config: ml_collections.ConfigDict, mesh: Mesh, path: str,
               num_images: int):
    self._config, self._mesh, self.path, self._num = config, mesh, path, int(num_images)
    self._classes = visualize.classes(config)
    self._predict = distributed.compiled_together(jax.jit(lambda params, batch: evaluate.predict(
        lambda x: model.apply({'params': params}, x, train=False), batch,
        eval_config=config.eval, num_classes=config.dataset.num_classes,
        **_inference_kwargs(config))), 'the figure\'s predictions')

  def _rows(self, params: PyTree) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    d = self._config.dataset
    mean, std = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)
    rows = []
    for batch in eval_batches(self._config, self._mesh):
      pred = _to_host(self._predict(params, batch))
      host = {key: _to_host(v) for key, v in batch.items()}
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

  @staticmethod
  def scalars(result: Mapping[str, Any], prefix: str) -> dict[str, float]:
    del result, prefix
    return {}

  @staticmethod
  def summary(result: Mapping[str, Any]) -> str:
    return f'{result["images"]} predictions drawn to {result["path"]}'


@dataclasses.dataclass
class Entry:
  name: str
  every_steps: int
  evaluator: Any  # MiouEvaluator | FigureEvaluator


def from_config(config: ml_collections.ConfigDict, model, mesh: Mesh, workdir: str, *,
                prefix: str = '') -> list[Entry]:
  """The evaluators of `config.evals`; figures go to WORKDIR/<prefix>predictions.png."""
  entries = []
  for name, spec in config.evals.items():
    kind, every = spec.get('type'), int(spec.get('every_steps', 0))
    if kind == 'miou':
      evaluator = MiouEvaluator(model, config, mesh)
    elif kind == 'figure':
      path = os.path.join(workdir, f'{prefix}predictions.png')
      evaluator = FigureEvaluator(model, config, mesh, path, spec.get('num_images', 4))
    else:
      raise UserError(f"config.evals.{name}.type={kind!r}: expected 'miou' or 'figure'.")
    entries.append(Entry(name, every, evaluator))
  return entries


def _run_one(entry: Entry, step: int, params: PyTree, writer, results: dict) -> dict[str, Any]:
  result = entry.evaluator.run(params)
  results[entry.name] = (step, result)
  scalars = entry.evaluator.scalars(result, f'{entry.name}/')
  if scalars:
    writer.write(step, scalars)
  cli.say(f'{entry.name} at step {step}: {entry.evaluator.summary(result)}')
  return result


def run_due(entries: list[Entry], due: Callable[[int], bool], step: int,
            params: Callable[[], PyTree], writer, results: dict,
            pause: Callable[[float], None]) -> Optional[float]:
  """Runs the entries whose `due(every_steps)` is true; returns the first mIoU entry's mIoU if
  it ran. `params()` gives the parameters (in the model's layout), called only when an entry is
  due. `pause(seconds)` is told how long the evaluations took (the ETA leaves them out)."""
  start, miou, fetched = time.time(), None, None
  for entry in entries:
    if due(entry.every_steps):
      fetched = params() if fetched is None else fetched
      result = _run_one(entry, step, fetched, writer, results)
      if miou is None and isinstance(entry.evaluator, MiouEvaluator):
        miou = float(result['miou'])
  pause(time.time() - start)
  return miou


def run_missing(entries: list[Entry], step: int, params: PyTree, writer, results: dict, *,
                include_off: bool = False) -> None:
  """Runs every entry that has no result at `step` yet: at the end of a run the entries that
  are on (every_steps != 0), in --mode=eval all of them (`include_off`)."""
  for entry in entries:
    if (entry.every_steps != 0 or include_off) and results.get(entry.name, (None,))[0] != step:
      _run_one(entry, step, params, writer, results)


def _json_ready(result: Mapping[str, Any]) -> dict[str, Any]:
  names = result['class_names']
  per_class = lambda key: dict(zip(names, (float(v) for v in np.asarray(result[key]))))
  return {'miou': float(result['miou']), 'macc': float(result['macc']),
          'aacc': float(result['aacc']), 'per_class_iou': per_class('per_class_iou'),
          'per_class_acc': per_class('per_class_acc')}


def write_final(entries: list[Entry], results: dict, path: str, step: int,
                **extra: Any) -> dict[str, Any]:
  """Writes the first mIoU entry's result at `step` to `path` (JSON; process 0) and returns the
  run's final outputs: {'<name>/miou', '<name>/macc', '<name>/aacc', 'metrics_file',
  'figure_file'} for the entries that produced them."""
  out: dict[str, Any] = {}
  for entry in entries:
    if entry.name not in results:
      continue
    _, result = results[entry.name]
    if isinstance(entry.evaluator, MiouEvaluator) and 'metrics_file' not in out:
      final = {'step': int(step), **extra, **_json_ready(result)}
      if jax.process_index() == 0:
        fileio.replace_file(path, json.dumps(final, indent=1))
      out.update({f'{entry.name}/{k}': final[k] for k in ('miou', 'macc', 'aacc')})
      out['metrics_file'] = path
    elif isinstance(entry.evaluator, FigureEvaluator) and result['images']:
      out.setdefault('figure_file', result['path'])
  return out
