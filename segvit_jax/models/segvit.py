"""SegViT assembled from a config: backbone + head, and the official inference (reference 1, 3.3).

    model = build_model(config.model)
    variables = model.init({'params': key}, images, train=False)
    scores = model.apply(variables, images, train=False)               # (B, H, W, K)
    outputs = model.apply(variables, images, train=True, rngs={'dropout': key})

`images` are (B, H, W, 3) float32, normalised as the config's dataset says. H and W need not be
equal nor match `img_size`.
"""

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segvit_jax import resize
from segvit_jax.models import atm
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
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    is_shrunk = c.name == 'segvit_shrunk'
    features = vit.VisionTransformer(
        img_size=tuple(c.img_size), patch_size=c.patch_size, embed_dim=c.embed_dim,
        depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
        out_indices=tuple(c.out_indices), drop_path_rate=c.drop_path_rate,
        shrink_index=c.shrink_index if is_shrunk else -1, remat=c.remat, dtype=dtype,
        name='backbone')(images, train=train)
    if is_shrunk:
      grid = (c.img_size[0] // c.patch_size, c.img_size[1] // c.patch_size)
      predictions = shrunk.QUHead(
          c.num_classes, grid, c.decoder_dim, c.decoder_heads, c.decoder_layers,
          c.decoder_dropout, dtype, name='head')(features[:c.use_stages], train=train)
    else:
      predictions = atm.ATMHead(
          c.num_classes, c.decoder_dim, c.decoder_heads, c.decoder_layers, c.use_stages,
          c.decoder_dropout, dtype, name='head')(features, train=train)

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


def check_model_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `config.model` key that cannot work."""
  def fail(key, message):
    raise ValueError(f'config.model.{key}: {message}')

  if c.name not in MODEL_NAMES:
    fail('name', f'{c.name!r} is not one of {MODEL_NAMES}.')
  if c.embed_dim % c.num_heads:
    fail('num_heads', f'embed_dim {c.embed_dim} is not divisible by num_heads {c.num_heads}.')
  if c.decoder_dim % c.decoder_heads:
    fail('decoder_heads', f'decoder_dim {c.decoder_dim} is not divisible by {c.decoder_heads}.')
  if any(not 0 <= i < c.depth for i in c.out_indices) or list(c.out_indices) != sorted(c.out_indices):
    fail('out_indices', f'{tuple(c.out_indices)} must be increasing block indices < depth {c.depth}.')
  if not 1 <= c.use_stages <= len(c.out_indices):
    fail('use_stages', f'{c.use_stages} must be between 1 and len(out_indices) = {len(c.out_indices)}.')
  if any(s % c.patch_size for s in c.img_size):
    fail('img_size', f'{tuple(c.img_size)} must be a multiple of patch_size {c.patch_size}.')
  if c.name == 'segvit_shrunk' and not 0 <= c.shrink_index < c.depth:
    fail('shrink_index', f'{c.shrink_index} must be a block index < depth {c.depth}.')
  if c.dtype not in ('float32', 'bfloat16'):
    fail('dtype', f'{c.dtype!r} is not float32 or bfloat16.')


def build_model(model_config: ml_collections.ConfigDict) -> SegViT:
  check_model_config(model_config)
  return SegViT(ml_collections.FrozenConfigDict(model_config))


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
