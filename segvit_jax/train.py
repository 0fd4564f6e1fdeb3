"""The training loop: mesh, sharded state, the train step, checkpoints, evaluation, logging.

    train_and_evaluate(config, workdir)   # resumes from WORKDIR/checkpoints by itself
    evaluate_checkpoint(config, workdir)  # --mode=eval: config.init_checkpoint or the latest step

Conventions:
- `state.step` counts the updates done. The update that takes it from s to s + 1 is "step s + 1":
  it uses the learning rate schedule(s) (mmcv's 0-based `runner.iter`), batch number s of the
  input pipeline and the dropout key fold_in(key, s). A run resumed from the checkpoint of step s
  therefore repeats, bit for bit, what an uninterrupted run does from step s + 1.
- Parameters and optimizer state are laid out by the logical-axis rules of `sharding` and are
  created already sharded (`jax.eval_shape`, then `jit` with `out_shardings`).
- Losses stay on device; they are fetched at log steps, before every checkpoint and at the end,
  and every fetched step is checked for a non-finite loss before anything is saved, so a
  diverged state never replaces a good checkpoint.
- SIGTERM (preemption) finishes the current step, saves it and returns normally (exit code 0).
- Only process 0 writes logs, TensorBoard events, metrics.jsonl and images; every process
  takes part in checkpoints.
"""

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging
from clu import metric_writers
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
from segvit_jax import evaluate as evaluate_lib
from segvit_jax import fileio
from segvit_jax import losses
from segvit_jax import optim
from segvit_jax import sharding
from segvit_jax.models import segvit
from segvit_jax.models import vit_pretrained

PyTree = Any

_MAX_STEPS_IN_FLIGHT = 2


# ---------------------------------------------------------------------------------------------
# Train state.


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done
  params: PyTree
  opt_state: PyTree


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the loss terms."""


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.model.num_classes != config.dataset.num_classes:
    raise ValueError(
        f'config.model.num_classes={config.model.num_classes} differs from '
        f'config.dataset.num_classes={config.dataset.num_classes}; set both to the dataset\'s K.')
  return segvit.build_model(config.model)


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, dropout base key) of a seed; inside jit, so no device transfer is needed."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  return init_key, dropout_key


@dataclasses.dataclass
class StateSpec:
  """What the sharded state looks like: shapes with their target shardings."""
  abstract: TrainState  # leaves: jax.ShapeDtypeStruct with .sharding set
  shardings: TrainState  # leaves: NamedSharding
  boxed_params: PyTree  # abstract params with their nn.Partitioned logical names


def state_spec(model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, mesh: Mesh) -> StateSpec:
  """Shapes and shardings of the train state, without allocating any of it."""
  boxed = segvit.abstract_params(model)
  param_shardings = sharding.logical_to_shardings(boxed, mesh)
  params = nn.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=opt_state)
  abstract = checkpoint_lib.abstract_like(abstract_state, shardings)
  return StateSpec(abstract=abstract, shardings=shardings, boxed_params=boxed)


def create_state(model: nn.Module, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, spec: StateSpec) -> TrainState:
  """A freshly initialised state, each leaf created directly in its shards."""
  def init():
    params = nn.unbox(segvit.init_variables(model, _keys(config.seed)[0])['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # Traced without logical-axis rules: the layout comes from `out_shardings` alone. (Under the
  # rules, flax's DenseGeneral applies its 3-d logical names to the flat 2-d kernel it
  # initialises, which fails on a mesh.)
  with nn.logical_axis_rules(()):
    return jax.jit(init, out_shardings=spec.shardings)()


def state_with_params(params: PyTree, tx: optax.GradientTransformation,
                      spec: StateSpec, *, source: str) -> TrainState:
  """A step-0 state around given (host or device) params, laid out as `spec` says.

  `source` names where the params come from, for the error when their tree does not match.
  """
  expected = spec.abstract.params
  want = {jax.tree_util.keystr(k): (tuple(v.shape), v.dtype)
          for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(k): (tuple(np.shape(v)), getattr(v, 'dtype', None))
         for k, v in jax.tree_util.tree_leaves_with_path(params)}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k][0] != got[k][0])
  if missing or extra or wrong:
    raise ValueError(
        f'The parameters from {source} do not fit config.model: '
        f'missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
        f'unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}, '
        f'wrong shapes {[(k, got[k][0], want[k][0]) for k in wrong[:5]]}.')
  def cast(x, a):
    if not isinstance(x, jax.Array):
      return np.asarray(x, a.dtype)
    return x if x.dtype == a.dtype else x.astype(a.dtype)

  params = jax.tree.map(cast, params, expected)
  params = jax.device_put(params, spec.shardings.params)

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=spec.shardings)(params)


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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array],
                    config: ml_collections.ConfigDict, mesh: Mesh,
                    state_shardings: TrainState) -> Callable[..., Any]:
  """The jitted (state, batch) -> (state, metrics); the state's buffers are donated.

  metrics: {'loss', every loss term, 'grad_norm', 'learning_rate'} float32 scalars, replicated.
  """
  num_classes = config.model.num_classes
  accum = int(config.optim.grad_accum_steps)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(f'config.optim.grad_accum_steps={accum} must be >= 1 and divide '
                     f'config.batch_size={config.batch_size}.')
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if (config.batch_size // accum) % shards:
    raise ValueError(
        f'config.batch_size / config.optim.grad_accum_steps = {config.batch_size // accum} '
        f'must be divisible by data x fsdp = {shards} of config.mesh={config.mesh!r}.')
  loss_kwargs = dict(config.loss)

  def batch_sharded(tree):
    # Inputs and model outputs split over the batch axes: the loss runs data-parallel too.
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, sharding.batch_sharding(mesh, x.ndim)), tree)

  def loss_fn(params, images, labels, rng):
    images, labels = batch_sharded((images, labels))
    outputs = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    outputs = batch_sharded(outputs)
    total, terms = losses.atm_loss(outputs, labels, num_classes=num_classes, **loss_kwargs)
    return total, terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(_keys(config.seed)[1], state.step)
    images = batch['image']
    labels = batch['label']
    if accum == 1:
      (loss, terms), grads = grad_fn(state.params, images, labels, rng)
    else:
      def body(carry, inputs):
        grad_sum, loss_sum, terms_sum = carry
        index, x, y = inputs
        (loss, terms), grads = grad_fn(state.params, x, y, jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss,
                jax.tree.map(jnp.add, terms_sum, terms)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      terms_shape = jax.eval_shape(
          lambda: grad_fn(state.params, images[:images.shape[0] // accum],
                          labels[:labels.shape[0] // accum], rng)[0][1])
      zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), terms_shape)
      inputs = (jnp.arange(accum), _micro_batches(images, accum, mesh),
                _micro_batches(labels, accum, mesh))
      (grads, loss, terms), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), zero_terms), inputs)
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      terms = jax.tree.map(lambda t: t / accum, terms)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, **terms, 'grad_norm': optax.global_norm(grads),
               'learning_rate': schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

  batch_shardings = {'image': sharding.batch_sharding(mesh, 4),
                     'label': sharding.batch_sharding(mesh, 3)}
  return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Logging.


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call to a file: {'step': s, name: value, ...}.

  Flushed after every line, so a killed run leaves every line it logged. NaN becomes null.
  """

  def __init__(self, path: str):
    self._file = fileio.open_file(path, 'a')

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    for key, value in scalars.items():
      value = float(value)
      record[key] = value if math.isfinite(value) else None
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class _NullWriter(JsonlWriter):
  """What processes other than 0 write: nothing."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass

  def write_scalars(self, step, scalars):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events + WORKDIR/metrics.jsonl on process 0; nothing on the others."""
  if jax.process_index() != 0:
    return _NullWriter()
  return metric_writers.MultiWriter([
      metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
  ])


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


class _Pending:
  """Per-step metrics still on device since the last fetch."""

  def __init__(self):
    self.items: list[tuple[int, Mapping[str, jax.Array]]] = []

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self.items.append((step, metrics))

  def fetch(self) -> list[tuple[int, dict[str, float]]]:
    """Fetches every pending step; raises NonFiniteLossError at the first non-finite loss."""
    if not self.items:
      return []
    steps = [s for s, _ in self.items]
    values = jax.device_get([m for _, m in self.items])
    self.items = []
    fetched = []
    for step, metrics in zip(steps, values):
      metrics = {k: float(v) for k, v in metrics.items()}
      # A finite loss with a non-finite gradient would write NaN parameters into this step's
      # state, so both are checked before anything after them is saved.
      if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
        terms = ', '.join(f'{k}={v:.6g}' for k, v in sorted(metrics.items()))
        what = 'loss' if not math.isfinite(metrics['loss']) else 'gradient'
        raise NonFiniteLossError(
            f'Non-finite {what} at step {step}: {terms}. Training stopped; the checkpoints in '
            'the workdir are from before this step. Lower config.optim.learning_rate or check '
            'the data.')
      fetched.append((step, metrics))
    return fetched


def _mean_metrics(fetched: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
  """Means over the logged interval; the learning rate is the last step's."""
  keys = fetched[-1][1].keys()
  out = {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}
  out['learning_rate'] = fetched[-1][1]['learning_rate']
  return out


# ---------------------------------------------------------------------------------------------
# Evaluation and pictures.


def _class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  try:
    from segvit_jax import palettes  # pylint: disable=g-import-not-at-top
    return tuple(palettes.class_names(config.dataset.name, config.dataset.num_classes))
  except (ImportError, ValueError):
    return tuple(str(k) for k in range(config.dataset.num_classes))


def _eval_batches(config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  from segvit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.create_eval_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count())
  return input_pipeline.global_batches(ds, mesh)


def run_evaluation(eval_step, params: PyTree, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> dict[str, Any]:
  """mIoU & co. of `params` over the eval split: `evaluate.evaluate`'s dict."""
  start = time.time()
  result = evaluate_lib.evaluate(eval_step, {'params': params}, _eval_batches(config, mesh),
                                 num_classes=config.dataset.num_classes,
                                 class_names=_class_names(config))
  result['eval_seconds'] = time.time() - start
  return result


def _eval_scalars(result: Mapping[str, Any]) -> dict[str, float]:
  from segvit_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  scalars = metrics_lib.to_scalars(dict(result), prefix='eval/')
  scalars['eval/seconds'] = float(result['eval_seconds'])
  return scalars


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_predictions(path: str, model: nn.Module, params: PyTree,
                      config: ml_collections.ConfigDict, mesh: Mesh, num_images: int) -> None:
  """Draws `num_images` eval examples as rows image | ground truth | prediction, with a legend."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  from segvit_jax import palettes  # pylint: disable=g-import-not-at-top

  k = config.dataset.num_classes
  names = _class_names(config)
  try:
    colors = palettes.palette(config.dataset.name, k)
  except ValueError:
    colors = palettes.color_table(k)

  predict = jax.jit(lambda params, batch: evaluate_lib.predict(
      lambda x: model.apply({'params': params}, x, train=False), batch, eval_config=config.eval,
      num_classes=k, test_img_scale=tuple(config.dataset.test_img_scale),
      test_min_size=int(config.dataset.test_min_size)))
  rows = []
  for batch in _eval_batches(config, mesh):
    pred = _to_host(predict(params, batch))
    host = {key: _to_host(v) for key, v in batch.items()}
    for i in range(pred.shape[0]):
      if not host['valid'][i] or len(rows) >= num_images:
        continue
      (h, w), (lh, lw) = host['image_size'][i], host['label_size'][i]
      mean = np.asarray(config.dataset.mean, np.float32)
      std = np.asarray(config.dataset.std, np.float32)
      image = np.clip(host['image'][i, :h, :w] * std + mean, 0, 255).astype(np.uint8)
      image = np.asarray(Image.fromarray(image).resize((int(lw), int(lh)), Image.BILINEAR))
      rows.append((image, host['label'][i, :lh, :lw], pred[i, :lh, :lw]))
    if len(rows) >= num_images:
      break
  if not rows or jax.process_index() != 0:
    return

  height = 160  # every row scaled to this height
  gap = 4
  tiles = []
  for image, label, pred in rows:
    scale = height / image.shape[0]
    size = (max(1, round(image.shape[1] * scale)), height)
    parts = [Image.fromarray(image).resize(size, Image.BILINEAR),
             Image.fromarray(palettes.colorize(label, colors)).resize(size, Image.NEAREST),
             Image.fromarray(palettes.colorize(pred, colors)).resize(size, Image.NEAREST)]
    tiles.append(parts)
  width = max(sum(p.size[0] for p in parts) + 2 * gap for parts in tiles)
  shown = sorted(set(np.concatenate([np.unique(l[l != 255]) for _, l, _ in rows] +
                                    [np.unique(p[p != 255]) for _, _, p in rows]).tolist()))
  legend_cols = max(1, width // 170)
  legend_rows = math.ceil(len(shown) / legend_cols)
  header = 18
  canvas = Image.new('RGB', (width, header + len(tiles) * (height + gap) + legend_rows * 18 + 8),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  try:  # a scalable font where Pillow has FreeType (its bitmap font drops spaces)
    font = ImageFont.load_default(size=13)
  except (TypeError, OSError):
    font = ImageFont.load_default()
  x = 0
  for title, part in zip(('image', 'ground truth', 'prediction'), tiles[0]):
    draw.text((x + 4, 2), title, fill=(0, 0, 0), font=font)
    x += part.size[0] + gap
  y = header
  for parts in tiles:
    x = 0
    for part in parts:
      canvas.paste(part, (x, y))
      x += part.size[0] + gap
    y += height + gap
  for n, c in enumerate(shown):
    lx, ly = (n % legend_cols) * 170 + 4, y + 4 + (n // legend_cols) * 18
    draw.rectangle([lx, ly, lx + 12, ly + 12], fill=tuple(int(v) for v in colors[c]),
                   outline=(0, 0, 0))
    draw.text((lx + 18, ly - 1), f'{c}: {names[c]}'[:24], fill=(0, 0, 0), font=font)
  with fileio.open_file(path, 'wb') as f:
    canvas.save(f, format='PNG')
  logging.info('Wrote %s.', path)


# ---------------------------------------------------------------------------------------------
# Preemption.


class _PreemptionFlag:
  """Set by SIGTERM; the loop checks it after each step (a handler must not touch JAX)."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step, then exiting.')
    self.event.set()

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must agree on the step at which to stop (JAX's preemption service).
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return multihost_utils.reached_preemption_sync_point(step) or self.event.is_set()
      except RuntimeError:
        pass
    return self.event.is_set()


# ---------------------------------------------------------------------------------------------
# Setup shared by train and eval.


def _setup(config: ml_collections.ConfigDict, devices: Optional[Sequence[jax.Device]]):
  jax.config.update('jax_threefry_partitionable', True)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config)
  spec = state_spec(model, tx, config, mesh)
  return mesh, model, tx, schedule, spec


def _make_eval_step(model, config):
  return evaluate_lib.make_eval_step(
      model, config.eval, config.dataset.num_classes,
      test_img_scale=tuple(config.dataset.test_img_scale),
      test_min_size=int(config.dataset.test_min_size))


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
  if jax.process_index() != 0:
    return

  def clean(v):
    if isinstance(v, (np.ndarray, list, tuple)):
      return [clean(x) for x in np.asarray(v).tolist()] if isinstance(v, np.ndarray) else \
          [clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
      return float(v) if math.isfinite(v) else None
    if isinstance(v, (np.integer,)):
      return int(v)
    return v

  with fileio.open_file(path, 'w') as f:
    json.dump({k: clean(v) for k, v in obj.items() if k != 'confusion_matrix'}, f, indent=1)


def _eval_summary(result: Mapping[str, Any]) -> dict[str, Any]:
  return {'miou': result['miou'], 'macc': result['macc'], 'aacc': result['aacc'],
          'per_class_iou': dict(zip(result['class_names'], np.asarray(result['per_class_iou'])
                                    .tolist())),
          'per_class_acc': dict(zip(result['class_names'], np.asarray(result['per_class_acc'])
                                    .tolist()))}


# ---------------------------------------------------------------------------------------------
# Train.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """Trains `config.num_train_steps` steps (resuming from WORKDIR/checkpoints) and evaluates.

  Returns the last logged train metrics and, when evaluated, the final eval metrics under
  'eval/...'. `devices` restricts the mesh (tests); default all devices.
  """
  from segvit_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  fileio.makedirs(workdir)
  is_main = jax.process_index() == 0
  mesh, model, tx, schedule, spec = _setup(config, devices)
  num_steps = int(config.num_train_steps)
  writer = create_writer(workdir)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                     keep=int(config.keep_checkpoints))
  preempted = _PreemptionFlag()
  preempted.install()
  try:
    with jax.set_mesh(mesh), sharding.axis_rules():
      latest = ckpt.latest_step()
      if latest is not None:
        logging.info('Resuming from %s, step %d.', ckpt.directory, latest)
        state = ckpt.restore(latest, spec.abstract, config=config)
      elif config.init_checkpoint:  # fine-tune: params from elsewhere, fresh optimizer
        params, _ = checkpoint_lib.load_params(config.init_checkpoint, spec.abstract.params,
                                               config=config, flag='config.init_checkpoint')
        state = state_with_params(params, tx, spec, source=config.init_checkpoint)
      else:
        state = create_state(model, tx, config, spec)
        if config.pretrained_backbone:  # the ImageNet ViT; the head keeps its initialisation
          state = state.replace(params=vit_pretrained.load(
              state.params, config.pretrained_backbone, config.model))
      start_step = int(jax.device_get(state.step))

      if is_main:
        parameter_overview.log_parameter_overview(
            state.params, include_stats='sharding', msg='Parameters (shape, sharding)')
        groups = optim.group_summary(state.params)
        logging.info('Mesh %s over %d devices. Optimizer groups: head (lr x%g, wd) %d params, '
                     'backbone with wd %d, backbone norms without wd %d.',
                     dict(mesh.shape), mesh.size, config.optim.head_lr_mult, groups.head,
                     groups.backbone_decay, groups.backbone_no_decay)
        checkpoint_lib.write_config(os.path.join(workdir, 'config.json'), config)

      train_step = make_train_step(model, tx, schedule, config, mesh, spec.shardings)
      eval_step = _make_eval_step(model, config)
      eval_every = int(config.eval_every_steps)
      ckpt_every = int(config.checkpoint_every_steps)
      log_every = max(int(config.log_every_steps), 1)
      hang_at = int(config.get('fault_hang_after_step', -1))
      raise_at = int(config.get('fault_raise_after_step', -1))

      train_ds = input_pipeline.create_train_dataset(
          config, process_index=jax.process_index(), process_count=jax.process_count(),
          start_step=start_step)
      batches = input_pipeline.global_batches(train_ds, mesh)

      pending = _Pending()
      last_logged: dict[str, float] = {}
      last_saved = start_step if latest is not None else None
      eval_result = None
      log_time, log_step = time.time(), start_step
      run_start = time.time()
      if start_step < num_steps:
        logging.info('Training from step %d to %d.', start_step, num_steps)

      def flush_and_log(step: int) -> None:
        nonlocal log_time, log_step, last_logged
        fetched = pending.fetch()
        if not fetched:
          return
        now = time.time()
        steps_per_sec = (step - log_step) / max(now - log_time, 1e-9)
        log_time, log_step = now, step
        mean = _mean_metrics(fetched)
        scalars = {f'train/{k}': v for k, v in mean.items() if k != 'learning_rate'}
        scalars['learning_rate'] = mean['learning_rate']
        scalars['steps_per_sec'] = steps_per_sec
        writer.write_scalars(step, scalars)
        last_logged = scalars
        if is_main:
          eta = (num_steps - step) / max(steps_per_sec, 1e-9)
          logging.info('step %d/%d (%.1f%%) | loss %.4f | lr %.3g | %.2f steps/s | ETA %s',
                       step, num_steps, 100.0 * step / num_steps, mean['loss'],
                       mean['learning_rate'], steps_per_sec, _format_duration(eta))

      def save(step: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        nonlocal last_saved
        flush_and_log(step)  # raises before saving if any step since the last save diverged
        if last_saved == step:
          return
        ckpt.save(step, state, metrics=metrics)
        last_saved = step

      step = start_step
      for step in range(start_step + 1, num_steps + 1):
        batch = next(batches)
        state, metrics = train_step(state, {'image': batch['image'], 'label': batch['label']})
        pending.add(step, metrics)
        # Bound how far the host runs ahead of the devices: a SIGTERM is then acted on within
        # a few steps, and few batches wait in device memory.
        if len(pending.items) > _MAX_STEPS_IN_FLIGHT:
          jax.block_until_ready(pending.items[-1 - _MAX_STEPS_IN_FLIGHT][1])
        if step == start_step + 1:
          logging.info('First step done (compiled) after %.1f s.', time.time() - run_start)
        if step % log_every == 0 or step == num_steps:
          flush_and_log(step)
        if preempted.reached(step):
          save(step)
          ckpt.wait()
          logging.warning('Preempted: saved step %d to %s; exiting.', step, ckpt.directory)
          return {'preempted_at_step': step, **last_logged}
        eval_metrics = None
        if eval_every > 0 and (step % eval_every == 0 or step == num_steps):
          flush_and_log(step)
          eval_result = run_evaluation(eval_step, state.params, config, mesh)
          log_time += eval_result['eval_seconds']  # steps/s and the ETA count training only
          eval_scalars = _eval_scalars(eval_result)
          writer.write_scalars(step, eval_scalars)
          eval_metrics = {checkpoint_lib.BEST_METRIC: eval_scalars['eval/miou']}
          if is_main:
            logging.info('Evaluation at step %d (%.1f s):\n%s', step,
                         eval_result['eval_seconds'], _format_table(eval_result))
        if (ckpt_every > 0 and step % ckpt_every == 0) or step == num_steps or eval_metrics:
          save(step, eval_metrics)
        if step == raise_at and jax.process_index() == jax.process_count() - 1:
          raise RuntimeError(f'config.fault_raise_after_step={step}: failing on purpose.')
        if step == hang_at:
          _hang_for_tests(ckpt, preempted, step)
          if preempted.reached(step):
            save(step)
            ckpt.wait()
            logging.warning('Preempted: saved step %d to %s; exiting.', step, ckpt.directory)
            return {'preempted_at_step': step, **last_logged}
      flush_and_log(step)
      ckpt.wait()
      if start_step < num_steps:
        logging.info('Training done: %d steps in %s.', num_steps - start_step,
                     _format_duration(time.time() - run_start))

      result = dict(last_logged)
      if eval_every > 0 and eval_result is None:  # resumed at the end: evaluate again
        eval_result = run_evaluation(eval_step, state.params, config, mesh)
      if eval_result is not None:
        result.update(_eval_scalars(eval_result))
        _write_json(os.path.join(workdir, 'final_metrics.json'),
                    {'step': num_steps, **_eval_summary(eval_result)})
        if is_main:
          logging.info('Final evaluation (step %d): mIoU %.4f, mAcc %.4f, aAcc %.4f.', num_steps,
                       eval_result['miou'], eval_result['macc'], eval_result['aacc'])
      n_images = int(config.get('num_prediction_images', 0))
      if n_images > 0 and eval_every > 0:
        write_predictions(os.path.join(workdir, 'predictions.png'), model, state.params, config,
                          mesh, n_images)
      return result
  finally:
    preempted.uninstall()
    writer.flush()
    ckpt.close()
    writer.close()


def _hang_for_tests(ckpt: checkpoint_lib.Checkpointer, preempted: _PreemptionFlag,
                    step: int) -> None:
  """`config.fault_hang_after_step`: wait, with the checkpoints written, until killed or SIGTERM.

  Lets a test kill the process at a known step (SIGKILL) or preempt it there (SIGTERM).
  """
  ckpt.wait()
  logging.warning('config.fault_hang_after_step=%d: waiting to be killed.', step)
  while not preempted.event.is_set():
    time.sleep(0.05)


def _format_table(result: Mapping[str, Any]) -> str:
  from segvit_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  return metrics_lib.format_table(dict(result))


# ---------------------------------------------------------------------------------------------
# Eval only.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """Evaluates config.init_checkpoint (converted or training) or WORKDIR's latest checkpoint.

  Writes WORKDIR/eval_metrics.json, an 'eval/...' line in metrics.jsonl and, with
  config.num_prediction_images > 0, WORKDIR/predictions.png.
  """
  fileio.makedirs(workdir)
  mesh, model, tx, _, spec = _setup(config, devices)
  source = config.init_checkpoint or workdir
  if not config.init_checkpoint and checkpoint_lib.training_checkpoint_root(workdir) is None:
    raise FileNotFoundError(
        f'--mode=eval needs --config.init_checkpoint=DIR (a segvit_jax.convert output or a '
        f'training workdir), or a checkpoint in --workdir={workdir!r}; found neither.')
  writer = create_writer(workdir)
  try:
    with jax.set_mesh(mesh), sharding.axis_rules():
      params, _ = checkpoint_lib.load_params(source, spec.abstract.params, config=config)
      eval_step = _make_eval_step(model, config)
      result = run_evaluation(eval_step, params, config, mesh)
      scalars = _eval_scalars(result)
      writer.write_scalars(0, scalars)
      if jax.process_index() == 0:
        logging.info('Evaluation of %s (%.1f s):\n%s', source, result['eval_seconds'],
                     _format_table(result))
      _write_json(os.path.join(workdir, 'eval_metrics.json'),
                  {'checkpoint': source, **_eval_summary(result)})
      n_images = int(config.get('num_prediction_images', 0))
      if n_images > 0:
        write_predictions(os.path.join(workdir, 'predictions.png'), model, params, config, mesh,
                          n_images)
      return scalars
  finally:
    writer.close()
