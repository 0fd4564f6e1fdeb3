"""SegViT assembled from a config: backbone + head, and the official inference (mmseg's
`EncoderDecoder`, `ATMHead.semantic_inference`).

    model = build_model(config.model, platform=mesh.devices.flat[0].platform)
    variables = model.init({'params': key}, images, train=False)
    scores = model.apply(variables, images, train=False)               # (B, H, W, K)
    outputs = model.apply(variables, images, train=True, rngs={'dropout': key})

`images` are (B, H, W, 3) float32, normalised as the config's dataset says. H and W need not be
equal nor match `img_size`. On a mesh of several TPU devices, trace under `jax.set_mesh(mesh)`:
the Pallas attention kernel runs in a `shard_map` over that mesh.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segvit_jax.models import resize
from segvit_jax.errors import UserError
from segvit_jax.models import atm
from segvit_jax.models import attention as attention_lib
from segvit_jax.models import shrunk
from segvit_jax.models import vit

MODEL_NAMES = ('segvit', 'segvit_shrunk')


def semantic_inference(class_logits: jnp.ndarray, masks: jnp.ndarray) -> jnp.ndarray:
  """Per-class scores from class logits (B, K, K+1) and mask logits (B, H, W, K): (B, H, W, K).

  Every query contributes to every class, weighted by its class probability; the no-object column
  is dropped after the softmax. Scores are non-negative, not logits.
  """
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
  return jnp.einsum('bqc,bhwq->bhwc', probs, jax.nn.sigmoid(masks.astype(jnp.float32)))


class SegViT(nn.Module):
  """ViT backbone + ATM head (`name='segvit'`) or QD ViT + QU/ATM head (`'segvit_shrunk'`).

  `train=True` returns {'class_logits': (B, K, K+1), 'mask_logits': (B, h, w, K),
  'aux': ({'class_logits', 'mask_logits'}, ...)}: everything the ATM loss needs, masks at the
  head's token resolution. `train=False` returns the scores (B, H, W, K).
  `attention`: the resolved `models.attention` implementation (see `build_model`).
  """
  config: ml_collections.ConfigDict
  attention: str = 'xla'

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    features = backbone(c, self.attention, name='backbone')(images, train=train)
    if c.name == 'segvit_shrunk':
      grid = (c.img_size[0] // c.patch_size, c.img_size[1] // c.patch_size)
      predictions = shrunk.QUHead(
          c.num_classes, grid, c.decoder_dim, c.decoder_heads, c.decoder_layers,
          c.decoder_dropout, dtype, attention=self.attention, name='head')(
              features[:c.use_stages], train=train)
    else:
      predictions = atm.ATMHead(
          c.num_classes, c.decoder_dim, c.decoder_heads, c.decoder_layers, c.use_stages,
          c.decoder_dropout, dtype, attention=self.attention, name='head')(features, train=train)

    class_logits, mask_logits = predictions[-1]
    if train:
      return {
          'class_logits': class_logits,
          'mask_logits': mask_logits,
          'aux': tuple({'class_logits': cl, 'mask_logits': ml} for cl, ml in predictions[:-1]),
      }
    # As the official head: masks to img_size, scores, then (EncoderDecoder) to the input size.
    masks = resize.resize_bilinear(mask_logits, tuple(c.img_size))
    scores = semantic_inference(class_logits, masks)
    return resize.resize_bilinear(scores, images.shape[1:3])


def remat_policy(c: ml_collections.ConfigDict) -> str:
  """config.model.remat as a key of `vit.REMAT_POLICIES`. Configs saved when remat was a bool
  (converted directories, older workdirs) hold False / True: 'none' / 'full'."""
  value = c.get('remat', 'none')
  if isinstance(value, bool):
    return 'full' if value else 'none'
  if value not in vit.REMAT_POLICIES:
    raise UserError(f'config.model.remat={value!r} is not one of '
                    f'{", ".join(map(repr, vit.REMAT_POLICIES))}.')
  return value


def backbone(c: ml_collections.ConfigDict, attention: str = 'xla', **kwargs
             ) -> vit.VisionTransformer:
  """The ViT of a (checked) model config; `attention` a resolved implementation."""
  return vit.VisionTransformer(
      img_size=tuple(c.img_size), patch_size=c.patch_size, embed_dim=c.embed_dim,
      depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
      out_indices=tuple(c.out_indices), drop_path_rate=c.drop_path_rate,
      shrink_index=c.shrink_index if c.name == 'segvit_shrunk' else -1,
      remat=remat_policy(c), attention=attention, scan_unroll=c.get('scan_unroll', 1),
      dtype=jnp.dtype(c.dtype), gelu_erf=c.get('gelu_erf', 'lax'), **kwargs)


def check_model_config(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the `config.model` key that cannot work."""
  def fail(key, message):
    raise UserError(f'config.model.{key}: {message}')

  if c.name not in MODEL_NAMES:
    fail('name', f'{c.name!r} is not one of {MODEL_NAMES}.')
  if c.embed_dim % c.num_heads:
    fail('num_heads', f'embed_dim {c.embed_dim} is not divisible by num_heads {c.num_heads}.')
  if c.decoder_dim % c.decoder_heads:
    fail('decoder_heads', f'decoder_dim {c.decoder_dim} is not divisible by {c.decoder_heads}.')
  if (any(not 0 <= i < c.depth for i in c.out_indices)
      or list(c.out_indices) != sorted(c.out_indices)):
    fail('out_indices',
         f'{tuple(c.out_indices)} must be increasing block indices < depth {c.depth}.')
  if not 1 <= c.use_stages <= len(c.out_indices):
    fail('use_stages',
         f'{c.use_stages} must be between 1 and len(out_indices) = {len(c.out_indices)}.')
  if any(s % c.patch_size for s in c.img_size):
    fail('img_size', f'{tuple(c.img_size)} must be a multiple of patch_size {c.patch_size}.')
  if c.name == 'segvit_shrunk' and not 0 <= c.shrink_index < c.depth:
    fail('shrink_index', f'{c.shrink_index} must be a block index < depth {c.depth}.')
  if c.dtype not in ('float32', 'bfloat16'):
    fail('dtype', f'{c.dtype!r} is not float32 or bfloat16.')
  remat_policy(c)
  if c.get('gelu_erf', 'lax') not in vit.GELU_ERFS:
    fail('gelu_erf', f'{c.gelu_erf!r} is not one of {vit.GELU_ERFS}.')
  unroll = c.get('scan_unroll', 1)
  if not isinstance(unroll, int) or unroll < 1:
    fail('scan_unroll', f'{unroll!r} must be a positive integer (blocks per scan iteration).')


def build_model(model_config: ml_collections.ConfigDict,
                platform: Optional[str] = None) -> SegViT:
  """The model of `config.model`, its attention chosen for `platform`.

  Args:
    model_config: config.model (checked here; UserError names a key that cannot work).
    platform: the platform of the devices the step runs on, `mesh.devices.flat[0].platform`
      ('cpu', 'tpu', 'gpu'); None: `jax.default_backend()`. Compiling on a CPU host for a TPU
      topology needs 'tpu' here.
  The implementation used is `model.attention` (`models.attention.resolve_attention`).
  """
  check_model_config(model_config)
  attention = attention_lib.resolve_attention(
      model_config.get('attention', 'auto'), platform or jax.default_backend(),
      model_config.dtype)
  return SegViT(ml_collections.FrozenConfigDict(model_config), attention=attention)


# ---------------------------------------------------------------------------------------------
# Parameter layouts: the model's stacked one and the official per-layer one.


def _map_params(fn, tree):
  """fn(mapping) on every {'backbone' / 'head': ...} mapping of a pytree (params, optimizer
  moments, a whole train state); everything else unchanged."""
  is_params = lambda x: isinstance(x, Mapping) and ('backbone' in x or 'head' in x)
  return jax.tree.map(lambda x: fn(x) if is_params(x) else x, tree, is_leaf=is_params)


def stack_params(tree, model_config: ml_collections.ConfigDict):
  """Official layout (one 'block_{i}' per ViT block, one 'layer_{l}' per decoder layer, as the
  converter's key tables and checkpoints written before the scans name them) -> the model's
  stacked layout, on every params mapping in `tree`. Leaves: arrays or ShapeDtypeStructs."""
  def one(params):
    out = dict(params)
    if isinstance(out.get('backbone'), Mapping):
      out['backbone'] = vit.stack_blocks(out['backbone'], model_config)
    if isinstance(out.get('head'), Mapping):
      out['head'] = atm.stack_layers(out['head'])
    return out
  return _map_params(one, tree)


def unstack_params(tree, model_config: ml_collections.ConfigDict):
  """The inverse of `stack_params` (e.g. on the abstract target of a restore)."""
  def one(params):
    out = dict(params)
    if isinstance(out.get('backbone'), Mapping):
      out['backbone'] = vit.unstack_blocks(out['backbone'], model_config)
    if isinstance(out.get('head'), Mapping):
      out['head'] = atm.unstack_layers(out['head'], model_config.decoder_layers)
    return out
  return _map_params(one, tree)


def has_unstacked_layout(params: Mapping[str, Any], model_config: ml_collections.ConfigDict
                         ) -> bool:
  """Whether a params mapping (or a checkpoint's metadata tree of one) is in the per-layer
  layout: then restore into `unstack_params(target)` and `stack_params` the result."""
  return (vit.has_per_block_layout(params.get('backbone', {}), model_config)
          or atm.has_per_layer_layout(params.get('head', {})))


def init_variables(model: SegViT, key: jax.Array) -> Dict[str, Any]:
  """Freshly initialised variables, traced at the stored `img_size`; leaves boxed with their
  logical axis names (`nn.Partitioned`, see `segvit_jax.sharding`)."""
  h, w = model.config.img_size
  return model.init({'params': key}, jnp.zeros((1, h, w, 3), jnp.float32), train=False)


def abstract_params(model: SegViT) -> Dict[str, Any]:
  """The params as boxed `jax.ShapeDtypeStruct`s (`jax.eval_shape` of the init): nothing is
  allocated. `nn.unbox` gives the plain tree of shapes."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))['params']


def param_counts(params: Dict[str, Any]) -> Tuple[int, int]:
  """(backbone, head) parameter counts of a params tree (arrays or ShapeDtypeStructs)."""
  def count(tree):
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
  return count(params['backbone']), count(params['head'])
