"""The evaluators of a run: built from `config.evals`, run when due, and their final results
written. What the training loop and --mode=eval call.

    config.evals.val = dict(type='miou', every_steps=4000)     # mIoU & co. over the eval split
    config.evals.figure = dict(type='figure', every_steps=-1, num_images=4)  # predictions.png

`every_steps`: N > 0 runs after every N-th step and after the last one; -1 only after the last
step; 0 never during training (--mode=eval runs every entry once). Scalars go to the metric
writers prefixed by the entry's name ('val/miou', 'val/iou/<class>'). What picks the best
checkpoint and what goes into final_metrics.json is each evaluator's to say (`registry.Evaluator`).
Inference follows `config.eval` (`InferenceSpec.from_config`).
"""

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
from jax.sharding import Mesh

from segvit_jax import cli
from segvit_jax import fileio
from segvit_jax.evaluation import inference
from segvit_jax.evaluation.evaluators import registry

PyTree = Any
_SCHEDULE_KEYS = ('type', 'every_steps')


@dataclasses.dataclass
class Entry:
  name: str
  every_steps: int
  evaluator: registry.Evaluator


def from_config(config: ml_collections.ConfigDict, model, mesh: Mesh, workdir: str, *,
                prefix: str = '') -> list[Entry]:
  """The evaluators of `config.evals`; their files go to WORKDIR/<prefix><file name>."""
  context = registry.Context(model, config, mesh, inference.InferenceSpec.from_config(config),
                             workdir, prefix)
  entries = []
  for name, spec in config.evals.items():
    options = {k: v for k, v in spec.items() if k not in _SCHEDULE_KEYS}
    evaluator = registry.create(name, spec.get('type'), context, options)
    entries.append(Entry(name, int(spec.get('every_steps', 0)), evaluator))
  return entries


def _run_one(entry: Entry, step: int, params: PyTree, writer, results: dict) -> Any:
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
  """Runs the entries whose `due(every_steps)` is true; returns the checkpoint metric of the first
  entry that ran and gives one (the mIoU). `params()` gives the parameters (in the model's
  layout), called only when an entry is due. `pause(seconds)` is told how long the evaluations
  took (the ETA leaves them out)."""
  start, best, fetched = time.time(), None, None
  for entry in entries:
    if due(entry.every_steps):
      fetched = params() if fetched is None else fetched
      result = _run_one(entry, step, fetched, writer, results)
      if best is None:
        best = entry.evaluator.checkpoint_metric(result)
  pause(time.time() - start)
  return best


def run_missing(entries: list[Entry], step: int, params: PyTree, writer, results: dict, *,
                include_off: bool = False) -> None:
  """Runs every entry that has no result at `step` yet: at the end of a run the entries that
  are on (every_steps != 0), in --mode=eval all of them (`include_off`)."""
  for entry in entries:
    if (entry.every_steps != 0 or include_off) and results.get(entry.name, (None,))[0] != step:
      _run_one(entry, step, params, writer, results)


def write_final(entries: list[Entry], results: dict, path: str, step: int,
                **extra: Any) -> dict[str, Any]:
  """Writes the entries' final metrics to `path` (JSON, process 0) and returns the run's final
  outputs ({'<name>/miou', '<name>/macc', '<name>/aacc', 'figure_file', ...} from the entries,
  'metrics_file' when `path` was written).

  The file holds {'step', **extra, the checkpoint-picking entry's metrics, '<name>': metrics of
  every other entry that has some}; nothing is written when no entry has final metrics.
  """
  done = [(entry, results[entry.name][1]) for entry in entries if entry.name in results]
  ranking = next((entry for entry, result in done
                  if entry.evaluator.checkpoint_metric(result) is not None), None)
  final: dict[str, Any] = {'step': int(step), **extra}
  named: dict[str, Any] = {}
  out: dict[str, Any] = {}
  has_metrics = False
  for entry, result in done:
    metrics = entry.evaluator.final_metrics(result)
    if metrics is not None:
      has_metrics = True
      if entry is ranking:
        final.update(metrics)
      else:
        named[entry.name] = metrics
    for key, value in entry.evaluator.outputs(entry.name, result).items():
      out.setdefault(key, value)
  if has_metrics:
    final.update(named)
    if jax.process_index() == 0:
      fileio.replace_file(path, json.dumps(final, indent=1))
    out['metrics_file'] = path
  return out
