"""The training loop: from the workdir's state to the last step, with logs, evaluators, checkpoints.

    train_and_evaluate(config, workdir)   # trains, resuming from WORKDIR/checkpoints by itself

Conventions:
- `state.step` counts the updates done. The update that takes it from s to s + 1 is "step s + 1":
  it uses the learning rate schedule(s) (mmcv's 0-based `runner.iter`), batch number s of the
  input pipeline and the dropout key fold_in(key, s). A run resumed from the checkpoint of step s
  therefore repeats, bit for bit, what an uninterrupted run does from step s + 1.
- Losses stay on device; they are fetched at log steps and before every checkpoint, and every
  fetched step is checked for a non-finite loss before anything is saved, so a diverged state
  never replaces a good checkpoint.
- SIGTERM (preemption) and SIGINT (Ctrl-C) finish the current step, save it and return; a second
  Ctrl-C stops at once.
- Only process 0 writes logs, TensorBoard events, metrics.jsonl and pictures; every process takes
  part in checkpoints.

The parts live beside this file: `build` (mesh, model, optimizer), `state` (the sharded state and
where a run starts from), `step` (the jitted update), `log` (metrics on the host, writers,
progress), `preemption` (stop signals).
"""

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import ml_collections

from segvit_jax import cli
from segvit_jax import distributed
from segvit_jax import fileio
from segvit_jax.checkpoint import training_checkpoints
from segvit_jax.evaluation import evaluators as evaluators_lib
from segvit_jax.training import build
from segvit_jax.training import log
from segvit_jax.training import preemption
from segvit_jax.training import state as state_lib
from segvit_jax.training import step as step_lib


@dataclasses.dataclass
class LoopOutcome:
  state: state_lib.TrainState
  results: dict[str, Any]  # evaluator name -> its last result
  last_logged: dict[str, float]
  saved_step: Optional[int] = None
  stopped_by: Optional[str] = None  # 'SIGTERM' / 'SIGINT' when stopped early


@dataclasses.dataclass
class Loop:
  """What the loop body works with, besides the state."""
  config: ml_collections.ConfigDict
  spec: state_lib.StateSpec
  train_step: Callable[..., Any]
  evals: list
  ckpt: training_checkpoints.Checkpointer
  writer: log.MetricsWriter
  stop: preemption.StopRequest
  pending: log.PendingMetrics
  progress: log.Progress


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """Trains `config.num_train_steps` steps (resuming from WORKDIR/checkpoints) and evaluates.

  Returns {'step', 'train/...' (the last logged means), the final evaluation's scalars,
  'stopped_by': 'SIGTERM' | 'SIGINT' when a signal stopped the run, 'already_done': True when
  the workdir had finished before}. `devices` restricts the mesh (default: all devices).
  """
  from segvit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  run = build.setup(config, devices)
  final_path = os.path.join(workdir, 'final_metrics.json')
  fileio.makedirs(workdir)
  ckpt = training_checkpoints.Checkpointer(training_checkpoints.checkpoint_dir(workdir),
                                           keep=int(config.keep_checkpoints))
  if jax.process_index() == 0:
    warning = ckpt.space_warning(run.spec.abstract)
    if warning:
      cli.say(warning)
  stop = preemption.StopRequest()
  stop.install()
  writer = None  # opened once the state is there: a workdir that cannot resume stays untouched
  try:
    with jax.set_mesh(run.mesh):
      # State: resume, fine-tune or fresh.
      state = state_lib.initial_state(config, run.model, run.tx, run.spec, ckpt)
      start = int(jax.device_get(state.step))
      if start >= int(config.num_train_steps) and fileio.exists(final_path):
        return _already_done(final_path, start)
      writer = log.MetricsWriter(workdir)
      log.describe_run(config, run.mesh, state.params, workdir)
      # Steps, evaluators and data.
      evals = evaluators_lib.from_config(config, run.model, run.mesh, workdir)
      train_step = step_lib.make_train_step(run.model, run.tx, run.schedule, config, run.mesh,
                                            run.spec)
      loop = Loop(config, run.spec, distributed.compiled_together(train_step, 'the train step'),
                  evals, ckpt, writer, stop, log.PendingMetrics(),
                  log.Progress(start, int(config.num_train_steps)))
      train_ds = input_pipeline.create_train_dataset(
          config, process_index=jax.process_index(), process_count=jax.process_count(),
          start_step=start)
      # The loop.
      outcome = _train_loop(state, input_pipeline.global_batches(train_ds, run.mesh), loop)
      step = int(jax.device_get(outcome.state.step))
      if outcome.stopped_by:
        cli.say(f'{outcome.stopped_by}: saved step {step} to {ckpt.directory}; rerun the '
                'same command to resume.')
        return {'step': step, 'stopped_by': outcome.stopped_by, **outcome.last_logged}
      # Final results: evaluators that did not run at this step (a resumed, finished run).
      params = state_lib.model_layout(outcome.state.params, run.spec)
      evaluators_lib.run_missing(evals, step, params, writer, outcome.results)
      result = {'step': step, **outcome.last_logged}
      result.update(evaluators_lib.write_final(evals, outcome.results, final_path, step))
      return result
  finally:
    stop.uninstall()
    ckpt.close()
    if writer is not None:
      writer.close()


def _train_loop(state: state_lib.TrainState, batches: Iterator[Any], loop: Loop) -> LoopOutcome:
  """Steps start + 1 .. config.num_train_steps, with logging, evaluators and checkpoints."""
  config = loop.config
  start, num_steps = int(jax.device_get(state.step)), int(config.num_train_steps)
  outcome = LoopOutcome(state, {}, {})
  if start < num_steps:
    cli.say(f'Training steps {start + 1}-{num_steps} (compiling the train step first).')
    batch = next(batches)
  for step in range(start + 1, num_steps + 1):
    outcome.state, metrics = loop.train_step(outcome.state, batch)
    loop.pending.add(step, metrics)
    if step == start + 1:
      loop.progress.first_step_done(step, metrics)
    if itstime(step, int(config.log_every_steps), num_steps):
      _log(step, loop, outcome)
    miou = evaluators_lib.run_due(
        loop.evals, lambda every: itstime(step, every, num_steps), step,
        lambda: state_lib.model_layout(outcome.state.params, loop.spec), loop.writer,
        outcome.results, loop.progress.pause)
    best = None if miou is None else {training_checkpoints.BEST_METRIC: miou}
    if best is not None or itstime(step, int(config.checkpoint_every_steps), num_steps):
      _save(step, loop, outcome, best)
    if step < num_steps:
      # Before the stop check: a signal that comes while the host waits for input stops the run
      # at this step, not one step later.
      batch = next(batches)
    if loop.stop.requested(step):
      _save(step, loop, outcome)
      outcome.stopped_by = loop.stop.signal_name
      break
  loop.ckpt.wait()
  return outcome


def _log(step: int, loop: Loop, outcome: LoopOutcome, *, show: bool = True) -> None:
  """Fetches the pending steps (the non-finite gate), writes their mean and, with `show`, prints
  the progress line."""
  mean = loop.pending.fetch_mean()
  if mean is None:
    return
  rate = loop.progress.steps_per_sec(step)
  scalars = {f'train/{k}': v for k, v in mean.items() if k != 'learning_rate'}
  scalars['learning_rate'] = mean['learning_rate']
  if rate > 0:  # none right after the first step: its time is compilation
    scalars['steps_per_sec'] = rate
  loop.writer.write(step, scalars)
  outcome.last_logged = scalars
  if show:
    cli.say(loop.progress.line(step, mean, rate))


def _save(step: int, loop: Loop, outcome: LoopOutcome, metrics=None) -> None:
  """Starts the save of `step` (once per step), after the non-finite gate."""
  _log(step, loop, outcome, show=False)  # raises before a diverged state is saved
  if outcome.saved_step != step:
    loop.ckpt.save(step, outcome.state, metrics=metrics)
    outcome.saved_step = step


def itstime(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action runs after `step`: every N-th step and the last one (N > 0),
  only the last one (N = -1), never (N = 0)."""
  if every == 0:
    return False
  return step == last_step or (every > 0 and step % every == 0)


def _already_done(final_path: str, step: int) -> dict[str, Any]:
  """The result of a workdir that finished before: its step and final validation scores."""
  with fileio.open_file(final_path) as f:
    final = json.load(f)
  cli.say(f'Already trained to step {step}; results in {final_path}.')
  return {'step': step, 'already_done': True,
          **{f'val/{k}': final[k] for k in ('miou', 'macc', 'aacc') if k in final}}
