"""The training loop: mesh, sharded state, the train step, checkpoints, evaluators, logging.

    train_and_evaluate(config, workdir)   # trains, resuming from WORKDIR/checkpoints by itself
    evaluate_checkpoint(config, workdir)  # --mode=eval: config.init_checkpoint or the latest step

Conventions:
- `state.step` counts the updates done. The update that takes it from s to s + 1 is "step s + 1":
  it uses the learning rate schedule(s) (mmcv's 0-based `runner.iter`), batch number s of the
  input pipeline and the dropout key fold_in(key, s). A run resumed from the checkpoint of step s
  therefore repeats, bit for bit, what an uninterrupted run does from step s + 1.
- Parameters and optimizer state are laid out by the logical-axis rules of `sharding` and are
  created already sharded (`jax.eval_shape`, then `jit` with `out_shardings`).
- Losses stay on device; they are fetched at log steps and before every checkpoint, and every
  fetched step is checked for a non-finite loss before anything is saved, so a diverged state
  never replaces a good checkpoint.
- SIGTERM (preemption) and SIGINT (Ctrl-C) finish the current step, save it and return; a second
  Ctrl-C stops at once.
- Only process 0 writes logs, TensorBoard events, metrics.jsonl and pictures; every process takes
  part in checkpoints.
"""

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from clu import parameter_overview
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segvit_jax import checkpoint as checkpoint_lib
from segvit_jax import cli
from segvit_jax import distributed
from segvit_jax.evaluation import evaluators as evaluators_lib
from segvit_jax import fileio
from segvit_jax import losses
from segvit_jax import optim
from segvit_jax.training import preflight
from segvit_jax import sharding
from segvit_jax.training import tensorboard_events
from segvit_jax.models import segvit

PyTree = Any

# Steps the host may dispatch ahead of the devices: a stop signal is acted on within a few steps,
# and few batches wait in device memory.
_MAX_STEPS_IN_FLIGHT = 2


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the loss terms."""


# ---------------------------------------------------------------------------------------------
# Train state.


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done
  params: PyTree
  opt_state: PyTree


@dataclasses.dataclass
class StateSpec:
  """What the sharded state looks like: shapes with their target shardings.

  The state keeps each parameter where its update runs (`update_shardings`: split over the
  batch axes too, as its Adam moments); the model reads it in `model_params`, the layout of its
  logical axes (replicated over the batch axes), gathered at the start of each step.
  """
  abstract: TrainState  # leaves: jax.ShapeDtypeStruct with .sharding set
  shardings: TrainState  # leaves: NamedSharding
  model_params: PyTree  # leaves: NamedSharding


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, dropout base key) of a seed; inside jit, so no device transfer is needed."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  return init_key, dropout_key


def state_spec(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh) -> StateSpec:
  """Shapes and shardings of the train state, without allocating any of it."""
  boxed = segvit.abstract_params(model)
  model_shardings = sharding.logical_to_shardings(boxed, mesh)
  params = nn.unbox(boxed)
  stored = update_shardings(model_shardings, params)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_state, stored,
                                        transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=stored, opt_state=opt_shardings)
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=opt_state)
  return StateSpec(checkpoint_lib.abstract_like(abstract_state, shardings), shardings,
                   model_shardings)


def model_layout(params: PyTree, spec: StateSpec) -> PyTree:
  """The state's parameters in the layout the model reads (`spec.model_params`), e.g. for an
  evaluation: gathered over the batch axes."""
  # A module-level function, so that jit's cache serves every evaluation after the first.
  return jax.jit(_identity, out_shardings=spec.model_params)(params)


def _identity(tree: PyTree) -> PyTree:
  return tree


def update_shardings(param_shardings: PyTree, params: PyTree) -> PyTree:
  """Per parameter, where its optimizer state lives and its update runs
  (`sharding.update_sharding`); `params`: anything with the parameters' shapes."""
  return jax.tree.map(lambda s, p: sharding.update_sharding(s, p.shape), param_shardings, params)


def create_state(model: nn.Module, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, spec: StateSpec) -> TrainState:
  """A freshly initialised state, each leaf created directly in its shards.

  Traced without logical-axis rules: the layout comes from `out_shardings` alone.
  """
  def init():
    params = nn.unbox(segvit.init_variables(model, _keys(config.seed)[0])['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return distributed.compiled_together(jax.jit(init, out_shardings=spec.shardings),
                                       'the initial state')()


def state_with_params(params: PyTree, tx: optax.GradientTransformation,
                      spec: StateSpec) -> TrainState:
  """A step-0 state around given params (already laid out as `spec.abstract.params`)."""
  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return distributed.compiled_together(jax.jit(init, out_shardings=spec.shardings),
                                       'the initial state')(params)


# ---------------------------------------------------------------------------------------------
# The train step.


def _micro_batches(x: jax.Array, num: int, mesh: Mesh) -> jax.Array:
  """(B, ...) -> (num, B / num, ...), micro-batch a = rows a, a + num, ... .

  Strided rather than contiguous rows: every device holds a slice of every micro-batch, so each
  scan iteration keeps all devices busy.
  """
  b = x.shape[0]
  x = x.reshape(b // num, num, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  spec = P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _accumulated(grad_fn, params, images, labels, rng, accum: int, mesh: Mesh):
  """Mean loss, terms and gradients over `accum` strided micro-batches, scanned."""
  def body(carry, inputs):
    index, x, y = inputs
    (loss, terms), grads = grad_fn(params, x, y, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

  micro = images.shape[0] // accum
  shapes = jax.eval_shape(grad_fn, params, images[:micro], labels[:micro], rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1],
                                                                shapes[1]))
  inputs = (jnp.arange(accum), _micro_batches(images, accum, mesh),
            _micro_batches(labels, accum, mesh))
  (loss, terms, grads), _ = jax.lax.scan(body, zeros, inputs)
  return jax.tree.map(lambda t: t / accum, ((loss, terms), grads))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array],
                    config: ml_collections.ConfigDict, mesh: Mesh,
                    spec: StateSpec) -> Callable[..., Any]:
  """The jitted (state, batch) -> (state, metrics); the state's buffers are donated.

  batch: {'image': (B, H, W, 3) float32 normalised, 'label': (B, H, W) int32, 255 = ignore}.
  metrics: {'loss', every loss term, 'grad_norm', 'learning_rate'} float32 scalars, replicated.
  """
  num_classes = config.model.num_classes
  accum = int(config.optim.grad_accum_steps)
  loss_kwargs = dict(config.loss)

  def batch_sharded(tree):
    # Inputs and model outputs split over the batch axes: the loss runs data-parallel too.
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, sharding.batch_sharding(mesh, x.ndim)), tree)

  constrain = lambda tree, shardings: jax.tree.map(jax.lax.with_sharding_constraint, tree,
                                                   shardings)

  def loss_fn(params, images, labels, rng):
    images, labels = batch_sharded((images, labels))
    outputs = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    outputs = batch_sharded(outputs)
    return losses.atm_loss(outputs, labels, num_classes=num_classes, **loss_kwargs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(_keys(config.seed)[1], state.step)
    # Gathered once, for every micro-batch. The barrier keeps the gather whole: left free, the
    # partitioner may fuse it into each layer's matmuls as a loop over the shards (a windowed
    # einsum) that reads the activations once per shard.
    params = jax.lax.optimization_barrier(constrain(state.params, spec.model_params))
    if accum == 1:
      (loss, terms), grads = grad_fn(params, batch['image'], batch['label'], rng)
    else:
      (loss, terms), grads = _accumulated(grad_fn, params, batch['image'], batch['label'],
                                          rng, accum, mesh)
    # The update runs on each device's part of the parameters and optimizer state, where the
    # state keeps them: the gradients, summed in the model's layout first, are taken to it.
    # Asked for the split layout straight away, the partitioner computes each weight gradient in
    # a loop over the shards (a windowed einsum) that reads the activations once per shard.
    # Kept in the model's layout instead, the new parameters were all-gathered in float32 into
    # the donated buffers each step, and both sides copied.
    grads = constrain(constrain(grads, spec.model_params), spec.shardings.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, **terms, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

  batch_shardings = {'image': sharding.batch_sharding(mesh, 4),
                     'label': sharding.batch_sharding(mesh, 3)}
  return jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings),
                 out_shardings=(spec.shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Metrics on the host: the non-finite gate, writers, progress.


def itstime(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action runs after `step`: every N-th step and the last one (N > 0),
  only the last one (N = -1), never (N = 0)."""
  if every == 0:
    return False
  return step == last_step or (every > 0 and step % every == 0)


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
        raise NonFiniteLossError(
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


# ---------------------------------------------------------------------------------------------
# Stop signals.


class StopRequest:
  """Set by SIGTERM (preemption) or SIGINT (Ctrl-C); the loop checks it after each step. A second
  SIGINT raises KeyboardInterrupt at once. (A signal handler must not touch JAX.)"""

  def __init__(self):
    self.event = threading.Event()
    self.signal_name: Optional[str] = None
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = self.signal_name or name
    cli.say(f'{name} received: saving a checkpoint after the current step '
                f'(Ctrl-C again to stop at once).' if name == 'SIGINT' else
                f'{name} received: saving a checkpoint after the current step.')
    self.event.set()

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; every process must call it at every step."""
    if jax.process_count() > 1:
      # Every host must agree on the step at which to stop (JAX's preemption service).
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = self.signal_name or 'SIGTERM'
          return True
      except RuntimeError:
        pass
    return self.event.is_set()


# ---------------------------------------------------------------------------------------------
# Set-up shared by training, evaluation and the compile tool.


class Setup(NamedTuple):
  mesh: Mesh
  model: segvit.SegViT
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  spec: StateSpec


def setup(config: ml_collections.ConfigDict,
          devices: Optional[Sequence[jax.Device]] = None) -> Setup:
  """Mesh over `devices` (default: all), model, optimizer and the state layout; allocates
  nothing."""
  jax.config.update('jax_threefry_partitionable', True)
  preflight.check(config, num_devices=len(devices) if devices is not None else jax.device_count(),
                  process_count=jax.process_count())
  mesh = sharding.make_mesh(config.mesh, devices)
  # The attention implementation follows the mesh's devices (e.g. TPU compiled from a CPU host).
  model = segvit.build_model(config.model, platform=mesh.devices.flat[0].platform)
  tx, schedule = optim.make_optimizer(config)
  return Setup(mesh, model, tx, schedule, state_spec(model, tx, mesh))


def _load_params(path: str, run: Setup, config: ml_collections.ConfigDict) -> PyTree:
  """Params of an exported directory or a training workdir, laid out as the state's; a converted
  checkpoint's class names and palette carry over to `config` (for tables and pictures)."""
  params, saved = checkpoint_lib.load_params(
      path, run.spec.abstract.params, config=config, flag='config.init_checkpoint',
      step=int(config.restore_step), step_flag='--config.restore_step')
  if saved is not None and saved.get('convert') and not config.get('convert'):
    with config.unlocked():
      config.convert = saved.convert
  return params


def _initial_state(config: ml_collections.ConfigDict, run: Setup,
                   ckpt: checkpoint_lib.Checkpointer) -> TrainState:
  """The newest readable checkpoint of the workdir, else a fresh state (params from
  config.init_checkpoint or config.pretrained_backbone when set)."""
  restored = ckpt.restore_newest(run.spec.abstract, config=config)
  if restored is not None:
    cli.say(f'Resuming from {ckpt.directory}, step {restored.step}.')
    return restored.state
  if config.init_checkpoint:  # fine-tune: params from elsewhere, a fresh optimizer
    cli.say(f'Initialising the parameters from {config.init_checkpoint}.')
    params = _load_params(config.init_checkpoint, run, config)
    return state_with_params(params, run.tx, run.spec)
  state = create_state(run.model, run.tx, config, run.spec)
  if config.pretrained_backbone:  # the ImageNet ViT; the head keeps its initialisation
    from segvit_jax.models import vit_pretrained  # pylint: disable=g-import-not-at-top
    cli.say(f'Loading the pretrained backbone {config.pretrained_backbone}.')
    state = state.replace(params=vit_pretrained.load(
        state.params, config.pretrained_backbone, config.model))
  elif config.model.depth >= 12:
    cli.say('Warning: no config.pretrained_backbone: the ViT trains from scratch (the '
                'paper configs start from ImageNet-21k weights; see the config\'s docstring).')
  return state


def _describe_run(config: ml_collections.ConfigDict, run: Setup, params: PyTree,
                  workdir: str) -> None:
  """config.json and parameters.txt in the workdir, one summary line on the console."""
  if jax.process_index() != 0:
    return
  checkpoint_lib.write_config(os.path.join(workdir, 'config.json'), config)
  table = parameter_overview.get_parameter_overview(params, include_stats='sharding')
  fileio.replace_file(os.path.join(workdir, 'parameters.txt'), table + '\n')
  backbone, head = segvit.param_counts(params)
  groups = optim.group_summary(params)
  cli.say(
      f'{config.model.name}: {(backbone + head) / 1e6:.2f}M parameters (backbone '
      f'{backbone / 1e6:.2f}M, head {head / 1e6:.2f}M, lr x{config.optim.head_lr_mult:g}; '
      f'{groups.backbone_no_decay:,} without weight decay) on a {dict(run.mesh.shape)} mesh of '
      f'{run.mesh.size} {run.mesh.devices.flat[0].platform.upper()} devices; table in '
      f'{os.path.join(workdir, "parameters.txt")}.')


# ---------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class LoopOutcome:
  state: TrainState
  results: dict[str, Any]  # evaluator name -> its last result
  last_logged: dict[str, float]
  saved_step: Optional[int] = None
  stopped_by: Optional[str] = None  # 'SIGTERM' / 'SIGINT' when stopped early


@dataclasses.dataclass
class Loop:
  """What the loop body works with, besides the state."""
  config: ml_collections.ConfigDict
  spec: StateSpec
  train_step: Callable[..., Any]
  evals: list
  ckpt: checkpoint_lib.Checkpointer
  writer: MetricsWriter
  stop: StopRequest
  pending: PendingMetrics
  progress: Progress
  after_step: Optional[Callable[..., None]]


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
  _log(step, loop, outcome, show=False)  # raises before a diverged state is saved
  if outcome.saved_step != step:
    loop.ckpt.save(step, outcome.state, metrics=metrics)
    outcome.saved_step = step


def _train_loop(state: TrainState, batches, loop: Loop) -> LoopOutcome:
  """Steps start + 1 .. config.num_train_steps, with logging, evaluators and checkpoints."""
  config = loop.config
  start, num_steps = int(jax.device_get(state.step)), int(config.num_train_steps)
  outcome = LoopOutcome(state, {}, {})
  if start < num_steps:
    cli.say(f'Training steps {start + 1}-{num_steps} (compiling the train step first).')
  for step in range(start + 1, num_steps + 1):
    outcome.state, metrics = loop.train_step(outcome.state, next(batches))
    loop.pending.add(step, metrics)
    if step == start + 1:
      loop.progress.first_step_done(step, metrics)
    if itstime(step, int(config.log_every_steps), num_steps):
      _log(step, loop, outcome)
    miou = evaluators_lib.run_due(loop.evals, lambda every: itstime(step, every, num_steps),
                                  step, lambda: model_layout(outcome.state.params, loop.spec),
                                  loop.writer, outcome.results, loop.progress.pause)
    best = None if miou is None else {checkpoint_lib.BEST_METRIC: miou}
    stopping = loop.stop.requested(step)
    if stopping or best is not None or itstime(step, int(config.checkpoint_every_steps),
                                                num_steps):
      _save(step, loop, outcome, best)
    if loop.after_step is not None:  # tests: may wait here for a signal
      loop.after_step(step, loop.ckpt, loop.stop)
      if loop.stop.event.is_set() and not stopping:
        stopping = True
        _save(step, loop, outcome)
    if stopping:
      outcome.stopped_by = loop.stop.signal_name
      break
  loop.ckpt.wait()
  return outcome


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[jax.Device]] = None,
                       after_step: Optional[Callable[..., None]] = None) -> dict[str, Any]:
  """Trains `config.num_train_steps` steps (resuming from WORKDIR/checkpoints) and evaluates.

  Returns {'step', 'train/...' (the last logged means), the final evaluation's scalars,
  'stopped_by': 'SIGTERM' | 'SIGINT' when a signal stopped the run, 'already_done': True when
  the workdir had finished before}. `devices` restricts the mesh (tests). `after_step(step,
  checkpointer, stop_request)` is called after every step (tests inject faults with it).
  """
  from segvit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  run = setup(config, devices)
  final_path = os.path.join(workdir, 'final_metrics.json')
  fileio.makedirs(workdir)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                     keep=int(config.keep_checkpoints))
  if jax.process_index() == 0:
    warning = ckpt.space_warning(run.spec.abstract)
    if warning:
      cli.say(warning)
  stop = StopRequest()
  stop.install()
  writer = None  # opened once the state is there: a workdir that cannot resume stays untouched
  try:
    with jax.set_mesh(run.mesh):
      # State: resume, fine-tune or fresh.
      state = _initial_state(config, run, ckpt)
      start = int(jax.device_get(state.step))
      if start >= int(config.num_train_steps) and fileio.exists(final_path):
        return _already_done(final_path, start)
      writer = MetricsWriter(workdir)
      _describe_run(config, run, state.params, workdir)
      # Steps, evaluators and data.
      evals = evaluators_lib.from_config(config, run.model, run.mesh, workdir)
      train_step = make_train_step(run.model, run.tx, run.schedule, config, run.mesh,
                                   run.spec)
      loop = Loop(config, run.spec, distributed.compiled_together(train_step, 'the train step'),
                  evals, ckpt, writer, stop, PendingMetrics(),
                  Progress(start, int(config.num_train_steps)), after_step)
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
      evaluators_lib.run_missing(evals, step, model_layout(outcome.state.params, run.spec),
                                 writer, outcome.results)
      result = {'step': step, **outcome.last_logged}
      result.update(evaluators_lib.write_final(evals, outcome.results, final_path, step))
      return result
  finally:
    stop.uninstall()
    ckpt.close()
    if writer is not None:
      writer.close()


def _already_done(final_path: str, step: int) -> dict[str, Any]:
  with fileio.open_file(final_path) as f:
    final = json.load(f)
  cli.say(f'Already trained to step {step}; results in {final_path}.')
  return {'step': step, 'already_done': True,
          **{f'val/{k}': final[k] for k in ('miou', 'macc', 'aacc') if k in final}}


# ---------------------------------------------------------------------------------------------
# Evaluation only.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """The evaluators of a run, once, on config.init_checkpoint or WORKDIR's latest checkpoint.

  Writes WORKDIR/eval_metrics.json (with the checkpoint and its step), an eval line at that step
  in metrics.jsonl and, when the config draws predictions, WORKDIR/eval_predictions.png.
  """
  source = config.init_checkpoint or workdir
  run = setup(config, devices)
  with jax.set_mesh(run.mesh):
    params = model_layout(_load_params(source, run, config), run.spec)
    step = checkpoint_lib.params_step(source, int(config.restore_step))
    fileio.makedirs(workdir)
    writer = MetricsWriter(workdir)
    try:
      evals = evaluators_lib.from_config(config, run.model, run.mesh, workdir, prefix='eval_')
      results = {}
      evaluators_lib.run_missing(evals, step, params, writer, results, include_off=True)
      path = os.path.join(workdir, 'eval_metrics.json')
      return {'step': step, **evaluators_lib.write_final(evals, results, path, step,
                                                         checkpoint=source)}
    finally:
      writer.close()
