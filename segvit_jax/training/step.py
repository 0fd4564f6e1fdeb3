"""The train step: one jitted, sharded update of the train state from a global batch.

    train_step = step.make_train_step(model, tx, schedule, config, mesh, spec)
    state, metrics = train_step(state, {'image': ..., 'label': ...})

The update that takes `state.step` from s to s + 1 uses the learning rate schedule at s (mmcv's
0-based `runner.iter`) and the dropout key fold_in(dropout base key, s). With
config.optim.grad_accum_steps = k > 1 the batch is split into k strided micro-batches whose
losses and gradients are averaged in a scan: one AdamW update on the mean gradient.
"""

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segvit_jax import losses
from segvit_jax import sharding
from segvit_jax.training import state as state_lib


class NonFiniteLossError(RuntimeError):
  """A step's loss or gradient became NaN or infinite; the message names the step and the loss
  terms. Raised on the host when the step's metrics are fetched (`log.PendingMetrics`)."""


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
                    spec: state_lib.StateSpec) -> Callable[..., Any]:
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

  def train_step(state: state_lib.TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state_lib.prng_keys(config.seed)[1], state.step)
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

