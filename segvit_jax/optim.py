"""The official optimizer recipe as an optax transformation (the official configs' AdamW +
poly schedule, grouped as mmcv 1.4.4's `DefaultOptimizerConstructor` groups them).

mmcv 1.4.4 builds AdamW with parameter groups from `paramwise_cfg.custom_keys`
{'head': lr x10, 'norm': decay 0, 'ln': decay 0}; the first matching key wins and 'head' is tried
first, so:
  * every parameter under `params['head']` trains at 10x the learning rate with full weight decay
    (its LayerNorms, queries and biases included);
  * backbone LayerNorms (the modules 'ln1' / 'ln2' of each block) get weight decay 0;
  * every other backbone parameter (patch embedding, position embedding, cls token, attention and
    FFN kernels and biases) gets the base learning rate and the base weight decay.
The gradient norm over all parameters is clipped to 35 before the Adam moments see it, and the
learning rate follows mmcv's poly schedule with a linear warmup, evaluated at the 0-based number of
updates already done (mmcv's `runner.iter` in `before_train_iter`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

HEAD = 'head'
BACKBONE = 'backbone'


def _path_names(path) -> tuple[str, ...]:
  """Key names along a `jax.tree_util` path, e.g. ('backbone', 'block_0', 'ln1', 'scale')."""
  names = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def is_head(names: tuple[str, ...]) -> bool:
  return bool(names) and names[0] == HEAD


def is_backbone_norm(names: tuple[str, ...]) -> bool:
  """mmcv's 'norm' / 'ln' custom keys, applied to backbone module names (not the leaf name).

  In the official backbone only `layers.{i}.ln1` / `ln2` match; the Flax backbone names those
  modules 'ln1' / 'ln2' as well. The leaf itself ('scale', 'bias', 'kernel') is never a module name.
  """
  if is_head(names):
    return False
  return any(n.startswith('ln') or 'norm' in n for n in names[:-1])


def lr_multipliers(params: PyTree, head_lr_mult: float) -> PyTree:
  """A tree like `params` of Python floats: `head_lr_mult` under 'head', 1.0 elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: head_lr_mult if is_head(_path_names(p)) else 1.0, params)


def weight_decay_mask(params: PyTree) -> PyTree:
  """A tree like `params` of bools: True where weight decay applies (all but backbone norms)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not is_backbone_norm(_path_names(p)), params)


def poly_warmup_schedule(
    base_lr: float,
    num_train_steps: int,
    *,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
) -> Callable[[jax.Array], jax.Array]:
  """mmcv `PolyLrUpdaterHook` with `warmup='linear'`, as a function of the 0-based update count.

    regular(it) = (base_lr - min_lr) * (1 - it / num_train_steps) ** power + min_lr
    lr(it)      = regular(it) * (1 - (1 - it / warmup_steps) * (1 - warmup_ratio))  if it < warmup
                = regular(it)                                                        otherwise

  Both factors are rearranged so float32 does not cancel: 1 - it/max is computed as (max - it)/max
  and the warmup factor as ratio + (it / warmup) * (1 - ratio). `it` is clamped to
  [0, num_train_steps] so a run past its end decays to `min_lr` instead of going negative.
  """
  if num_train_steps <= 0:
    raise ValueError(f'num_train_steps must be positive, got {num_train_steps}.')

  def schedule(count):
    it = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, float(num_train_steps))
    remaining = (float(num_train_steps) - it) / float(num_train_steps)
    lr = (base_lr - min_lr) * remaining ** power + min_lr
    if warmup_steps > 0:
      progress = it / float(warmup_steps)
      factor = warmup_ratio + progress * (1.0 - warmup_ratio)
      lr = jnp.where(it < warmup_steps, lr * factor, lr)
    return lr

  return schedule


def schedule_from_config(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """The base (backbone) learning rate schedule of `config.optim` over `config.num_train_steps`."""
  o = config.optim
  return poly_warmup_schedule(
      o.learning_rate, config.num_train_steps, power=o.poly_power, min_lr=o.min_lr,
      warmup_steps=o.warmup_steps, warmup_ratio=o.warmup_ratio)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_` as mmcv calls it: g * min(1, max_norm / (|g| + 1e-6)).

  The norm is over every gradient leaf together (mmcv clips all trainable parameters at once).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_tree(multipliers_fn: Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
  """Multiplies each update leaf by a static per-leaf factor computed from the update tree."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    mults = multipliers_fn(updates)
    return jax.tree.map(lambda g, m: g * jnp.asarray(m, g.dtype), updates, mults), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """AdamW with the official parameter groups, clipping and schedule.

  Returns (tx, schedule): `schedule(step)` is the base learning rate used for the update that
  starts at `step` updates done (the head uses `head_lr_mult` times it). torch AdamW's decoupled
  decay p <- p - lr_g * wd * p uses the group lr, so the weight decay term is added before the
  per-group lr multiplier.
  """
  o = config.optim
  schedule = schedule_from_config(config)
  parts = []
  if o.grad_clip_norm and o.grad_clip_norm > 0:
    parts.append(clip_by_global_norm_torch(o.grad_clip_norm))
  parts += [
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
      optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask),
      scale_by_tree(lambda tree: lr_multipliers(tree, o.head_lr_mult)),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts), schedule


class GroupSummary(NamedTuple):
  """Parameter counts per optimizer group, for the start-of-run overview."""
  head: int
  backbone_decay: int
  backbone_no_decay: int


def group_summary(params: PyTree) -> GroupSummary:
  counts = {'head': 0, 'decay': 0, 'no_decay': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = _path_names(path)
    size = int(leaf.size)
    if is_head(names):
      counts['head'] += size
    elif is_backbone_norm(names):
      counts['no_decay'] += size
    else:
      counts['decay'] += size
  return GroupSummary(counts['head'], counts['decay'], counts['no_decay'])
