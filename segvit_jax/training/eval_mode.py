"""Evaluation of a checkpoint without training (`segvit_jax.main --mode=eval`).

    eval_mode.evaluate_checkpoint(config, workdir)  # config.init_checkpoint or WORKDIR's latest

The run's own evaluators (config.evals) run once, each whether or not it would run during
training, on the parameters laid out as a training run's evaluations get them.
"""

import os
from typing import Any, Optional, Sequence

import jax
import ml_collections

from segvit_jax import fileio
from segvit_jax.checkpoint import parameters
from segvit_jax.evaluation import evaluators as evaluators_lib
from segvit_jax.training import build
from segvit_jax.training import log
from segvit_jax.training import state as state_lib


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """The evaluators of a run, once, on config.init_checkpoint or WORKDIR's latest checkpoint.

  Writes WORKDIR/eval_metrics.json (with the checkpoint and its step), an eval line at that step
  in metrics.jsonl and, when the config draws predictions, WORKDIR/eval_predictions.png.
  `devices` restricts the mesh (default: all devices).
  """
  source = config.init_checkpoint or workdir
  run = build.setup(config, devices)
  with jax.set_mesh(run.mesh):
    params = state_lib.model_layout(state_lib.load_params(source, run.spec, config), run.spec)
    step = parameters.params_step(source, int(config.restore_step))
    fileio.makedirs(workdir)
    writer = log.MetricsWriter(workdir)
    try:
      evals = evaluators_lib.from_config(config, run.model, run.mesh, workdir, prefix='eval_')
      results = {}
      evaluators_lib.run_missing(evals, step, params, writer, results, include_off=True)
      path = os.path.join(workdir, 'eval_metrics.json')
      return {'step': step, **evaluators_lib.write_final(evals, results, path, step,
                                                         checkpoint=source)}
    finally:
      writer.close()
