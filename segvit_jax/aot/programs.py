"""The programs a run compiles, from shapes only: its train and eval steps and their inputs.

The one place in `aot` that knows how segvit_jax.training builds its steps (`build.setup`, the
train step of `step`, the eval step of `evaluation.eval_loop`): what is compiled here is what a
run compiles.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from segvit_jax import sharding
from segvit_jax.evaluation import inference


@dataclasses.dataclass
class Programs:
  mesh: Any
  state: Any  # abstract train state, leaves carrying their shardings
  eval_params: Any  # abstract parameters as evaluations get them (the model's layout)
  train_step: Any  # jitted (state, batch) -> (state, metrics)
  eval_step: Any  # jitted (variables, batch, confusion) -> confusion
  attention: str  # which attention the ViT blocks use in these programs


def build_programs(config: ml_collections.ConfigDict, devices) -> Programs:
  """The train and eval steps of a run of `config` on `devices`, as the trainer builds them."""
  from segvit_jax.evaluation import eval_loop  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import build  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import step  # pylint: disable=g-import-not-at-top
  run = build.setup(config, devices)
  train_step = step.make_train_step(run.model, run.tx, run.schedule, config, run.mesh, run.spec)
  eval_step = jax.jit(
      eval_loop.make_eval_step(run.model, inference.InferenceSpec.from_config(config)),
      out_shardings=sharding.replicated(run.mesh))
  eval_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             run.spec.abstract.params, run.spec.model_params)
  return Programs(mesh=run.mesh, state=run.spec.abstract, eval_params=eval_params,
                  train_step=train_step, eval_step=eval_step, attention=run.model.attention)


def abstract_batches(config: ml_collections.ConfigDict, mesh, train_batch: int,
                     eval_batch: int):
  """Shapes (with shardings) of a train batch and an eval batch, as input_pipeline makes them.

  Train: image (B, H, W, 3) float32, label (B, H, W) int32 at the crop size. Eval: the padded
  bucket (config.dataset.eval_pad_size), with the sizes, per-scale sizes and validity of each row.
  """

  def array(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

  d = config.dataset
  ch, cw = d.crop_size
  (ih, iw), (lh, lw) = d.eval_pad_size, d.eval_label_pad_size
  train = {'image': array((train_batch, ch, cw, 3), jnp.float32),
           'label': array((train_batch, ch, cw), jnp.int32)}
  evaluation = {'image': array((eval_batch, ih, iw, 3), jnp.float32),
                'image_size': array((eval_batch, 2), jnp.int32),
                'label': array((eval_batch, lh, lw), jnp.int32),
                'label_size': array((eval_batch, 2), jnp.int32),
                'scaled_size': array((eval_batch, len(config.eval.scales), 2), jnp.int32),
                'valid': array((eval_batch,), jnp.bool_)}
  return train, evaluation


def abstract_confusion(config: ml_collections.ConfigDict, mesh) -> jax.ShapeDtypeStruct:
  """The eval step's running confusion matrix: (K, K) int32, replicated."""
  k = config.dataset.num_classes
  return jax.ShapeDtypeStruct((k, k), jnp.int32, sharding=sharding.replicated(mesh))
