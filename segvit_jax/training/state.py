"""The train state: its pytree, where each leaf lives on the mesh, and the state a run starts from.

    spec = state.state_spec(model, tx, mesh)              # shapes + shardings, nothing allocated
    initial = state.initial_state(config, model, tx, spec, ckpt)  # resume / fine-tune / fresh

- `TrainState.step` counts the updates done (see `segvit_jax.training.loop` for what step s is).
- Parameters and optimizer state are laid out by the logical-axis rules of `sharding` and are
  created already sharded (`jax.eval_shape`, then `jit` with `out_shardings`).
- The seed gives two keys (`prng_keys`): one initialises the parameters, the other is the base of
  the per-step dropout keys.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from segvit_jax import cli
from segvit_jax import distributed
from segvit_jax import sharding
from segvit_jax.checkpoint import parameters
from segvit_jax.checkpoint import training_checkpoints
from segvit_jax.models import segvit

PyTree = Any


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


def prng_keys(seed: int) -> tuple[jax.Array, jax.Array]:
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
  return StateSpec(training_checkpoints.abstract_like(abstract_state, shardings), shardings,
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
    params = nn.unbox(segvit.init_variables(model, prng_keys(config.seed)[0])['params'])
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


def load_params(path: str, spec: StateSpec, config: ml_collections.ConfigDict) -> PyTree:
  """Params of an exported directory or a training workdir, laid out as the state's; a converted
  checkpoint's class names and palette carry over to `config` (for tables and pictures)."""
  params, saved = parameters.load_params(
      path, spec.abstract.params, config=config, flag='config.init_checkpoint',
      step=int(config.restore_step), step_flag='--config.restore_step')
  if saved is not None and saved.get('convert') and not config.get('convert'):
    with config.unlocked():
      config.convert = saved.convert
  return params


def initial_state(config: ml_collections.ConfigDict, model: nn.Module,
                  tx: optax.GradientTransformation, spec: StateSpec,
                  ckpt: training_checkpoints.Checkpointer) -> TrainState:
  """The newest readable checkpoint of the workdir, else a fresh state (params from
  config.init_checkpoint or config.pretrained_backbone when set)."""
  restored = ckpt.restore_newest(spec.abstract, config=config)
  if restored is not None:
    cli.say(f'Resuming from {ckpt.directory}, step {restored.step}.')
    return restored.state
  if config.init_checkpoint:  # fine-tune: params from elsewhere, a fresh optimizer
    cli.say(f'Initialising the parameters from {config.init_checkpoint}.')
    params = load_params(config.init_checkpoint, spec, config)
    return state_with_params(params, tx, spec)
  state = create_state(model, tx, config, spec)
  if config.pretrained_backbone:  # the ImageNet ViT; the head keeps its initialisation
    from segvit_jax.models import vit_pretrained  # pylint: disable=g-import-not-at-top
    cli.say(f'Loading the pretrained backbone {config.pretrained_backbone}.')
    state = state.replace(params=vit_pretrained.load(
        state.params, config.pretrained_backbone, config.model))
  elif config.model.depth >= 12:
    cli.say('Warning: no config.pretrained_backbone: the ViT trains from scratch (the '
            'paper configs start from ImageNet-21k weights; see the config\'s docstring).')
  return state
