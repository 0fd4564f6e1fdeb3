"""A training run's logs: step metrics brought to the host, the files they go to, the console.

- `PendingMetrics`: the per-step metrics left on device until a log step or a checkpoint, then
  fetched together; every fetched step is checked for a non-finite loss or gradient
  (`step.NonFiniteLossError`) before anything is saved, so a diverged state never replaces a good
  checkpoint.
- `MetricsWriter`: WORKDIR/metrics.jsonl (`JsonlFile`) and TensorBoard events
  (`tensorboard_events`), written by process 0 only.
- `Progress`: speed and ETA for the progress line.
- `describe_run`: WORKDIR/config.json, WORKDIR/parameters.txt and the one-line summary.
"""

import json
import math
import os
import time
from typing import Any, Mapping, Optional

from clu import parameter_overview
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from segvit_jax import cli
from segvit_jax import config as config_lib
from segvit_jax import fileio
from segvit_jax import optim
from segvit_jax.models import segvit
from segvit_jax.training import step as step_lib
from segvit_jax.training import tensorboard_events

# Steps the host may dispatch ahead of the devices: a stop signal is acted on within a few steps,
# and few batches wait in device memory.
_MAX_STEPS_IN_FLIGHT = 2


class PendingMetrics:
  """Per-step metrics still on device since the last fetch."""

  def __init__(self):
    self.items: list[tuple[int, Mapping[str, jax.Array]]] = []

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self.items.append((step, metrics))
    if len(self.items) > _MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(self.items[-1 - _MAX_STEPS_IN_FLIGHT][1])

  def fetch_mean(self) -> Optional[dict[str, float]]:
    """Means over the pending steps (the learning rate: the last step's), None if none.

    Raises NonFiniteLossError at the first step with a non-finite loss or gradient: a finite
    loss with a non-finite gradient would write NaN parameters into that step's state.
    """
    if not self.items:
      return None
    steps = [s for s, _ in self.items]
    values = [{k: float(v) for k, v in m.items()} for m in jax.device_get(
        [m for _, m in self.items])]
    self.items = []
    for step, metrics in zip(steps, values):
      if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
        terms = ', '.join(f'{k}={v:.6g}' for k, v in sorted(metrics.items()))
        what = 'loss' if not math.isfinite(metrics['loss']) else 'gradient'
        raise step_lib.NonFiniteLossError(
            f'Non-finite {what} at step {step}: {terms}. Training stopped; the checkpoints in '
            'the workdir are from before this step. Lower config.optim.learning_rate or check '
            'the data.')
    mean = {k: float(np.mean([m[k] for m in values])) for k in values[-1]}
    mean['learning_rate'] = values[-1]['learning_rate']
    return mean


class JsonlFile:
  """Appends one JSON object per write to a file: {'step': s, name: value, ...}, NaN as null,
  flushed at once so that a killed run keeps every line it wrote; a write that fails (a full
  disk) leaves no part of its line (`fileio.AppendFile`) and raises StorageError."""

  def __init__(self, path: str):
    self._file = fileio.AppendFile(path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {'step': int(step)}
    record.update({k: float(v) if math.isfinite(float(v)) else None for k, v in scalars.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsWriter:
  """WORKDIR/metrics.jsonl and TensorBoard events (where the tensorboard package is installed),
  written by process 0; the other processes write nothing."""

  def __init__(self, workdir: str):
    main = jax.process_index() == 0
    self._jsonl = JsonlFile(os.path.join(workdir, 'metrics.jsonl')) if main else None
    self._events = None
    if main and tensorboard_events.available():
      self._events = tensorboard_events.EventFile(workdir)
    elif main:
      cli.say('TensorBoard events off (the tensorboard package is not installed); metrics '
              f'go to {os.path.join(workdir, "metrics.jsonl")}.')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    for out in (self._jsonl, self._events):
      if out is not None:
        out.write(step, scalars)

  def close(self) -> None:
    for out in (self._jsonl, self._events):
      if out is not None:
        out.close()


def format_duration(seconds: float) -> str:
  """'1h02m03s', or '2m03s' under an hour."""
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


class Progress:
  """Training speed and ETA, counted from the end of the first (compiling) step of this run,
  with evaluation time left out."""

  def __init__(self, start_step: int, num_steps: int):
    self.num_steps = num_steps
    self._mark = (start_step, time.time())
    self._run_start = time.time()

  def first_step_done(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    jax.block_until_ready(metrics)
    cli.say(f'Compiled and ran the first step in {time.time() - self._run_start:.1f} s.')
    self._mark = (step, time.time())

  def pause(self, seconds: float) -> None:
    self._mark = (self._mark[0], self._mark[1] + seconds)

  def steps_per_sec(self, step: int) -> float:
    mark_step, mark_time = self._mark
    rate = (step - mark_step) / max(time.time() - mark_time, 1e-9)
    self._mark = (step, time.time())
    return rate

  def line(self, step: int, mean: Mapping[str, float], rate: float) -> str:
    """The progress line; no speed yet right after the first (compiling) step."""
    speed = (f'{rate:.2f} steps/s | ETA '
             f'{format_duration((self.num_steps - step) / rate)}') if rate > 0 else 'timing'
    return (f'step {step}/{self.num_steps} ({100.0 * step / self.num_steps:.1f}%) | loss '
            f'{mean["loss"]:.4f} | lr {mean["learning_rate"]:.3g} | {speed}')


def describe_run(config: ml_collections.ConfigDict, mesh: Mesh, params: Any,
                 workdir: str) -> None:
  """config.json and parameters.txt in the workdir, one summary line on the console (process 0)."""
  if jax.process_index() != 0:
    return
  config_lib.write_config(os.path.join(workdir, 'config.json'), config)
  table = parameter_overview.get_parameter_overview(params, include_stats='sharding')
  fileio.replace_file(os.path.join(workdir, 'parameters.txt'), table + '\n')
  backbone, head = segvit.param_counts(params)
  groups = optim.group_summary(params)
  cli.say(
      f'{config.model.name}: {(backbone + head) / 1e6:.2f}M parameters (backbone '
      f'{backbone / 1e6:.2f}M, head {head / 1e6:.2f}M, lr x{config.optim.head_lr_mult:g}; '
      f'{groups.backbone_no_decay:,} without weight decay) on a {dict(mesh.shape)} mesh of '
      f'{mesh.size} {mesh.devices.flat[0].platform.upper()} devices; table in '
      f'{os.path.join(workdir, "parameters.txt")}.')
