"""The Attention-to-Mask (ATM) decoder (official `decode_heads/atm_head.py`) and its single-stage
form (`decode_heads/atm_single_head.py`).

Class query c is the query of class c (no matching). Mask logits are the head-averaged pre-softmax
logits of each decoder layer's cross-attention; class logits come from the layer's output.
Outputs of every head here: a tuple of (class_logits (B, K, K+1), mask_logits (B, h, w, K)),
one per prediction in order (the last is the final prediction, the others are auxiliary).
"""

import functools
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from segvit_jax.models import layers
from segvit_jax.models import stacking

Dtype = Any
HEAD_LN_EPS = 1e-5  # PyTorch's default, used by every LayerNorm in the heads.
# PyTorch's default xavier-uniform on the stacked (3d, d) `in_proj_weight`: bound sqrt(6 / 4d).
in_proj_init = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')
STACKED = 'layers'  # the name of a decoder's scanned layers


class DecoderLayer(nn.Module):
  """Post-norm decoder layer (torch `TransformerDecoderLayer`: dropout 0.1, ReLU, eps 1e-5).

  Call: `(queries (B, Nq, d), memory (B, Nk, d), deterministic)` ->
  `(queries, mask_logits (B, Nq, Nk))`. The mask comes from the cross-attention whose queries are
  the output of self-attention + norm1; QU (standard decoders) has none: mask_logits is None.
  `standard_cross_attn`: torch's own cross-attention (QU) rather than ATM's `Attention`; the
  computation is the same, only the initialisation differs (xavier `in_proj` vs trunc-normal q/k/v).
  """
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  standard_cross_attn: bool = False
  attention: str = 'xla'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t, memory, deterministic: bool):
    d = t.shape[-1]
    dropout = functools.partial(layers.Dropout(self.dropout_rate), deterministic=deterministic)
    attended, _ = layers.Attention(
        self.num_heads, self.dropout_rate, kernel_init=in_proj_init, attention=self.attention,
        dtype=self.dtype, name='self_attn')(t, t, deterministic)
    t = layers.layer_norm('norm1', HEAD_LN_EPS)(t + dropout(attended)).astype(self.dtype)
    attended, mask_logits = layers.Attention(
        self.num_heads, self.dropout_rate, return_mask_logits=not self.standard_cross_attn,
        attention=self.attention, dtype=self.dtype,
        kernel_init=in_proj_init if self.standard_cross_attn else layers.trunc_normal_02,
        name='cross_attn')(t, memory, deterministic)
    t = layers.layer_norm('norm2', HEAD_LN_EPS)(t + dropout(attended)).astype(self.dtype)
    y = layers.dense(self.mlp_ratio * d, 'linear1', self.dtype, 'embed', 'mlp')(t)
    y = layers.dense(d, 'linear2', self.dtype, 'mlp', 'embed')(dropout(nn.relu(y)))
    t = layers.layer_norm('norm3', HEAD_LN_EPS)(t + dropout(y)).astype(self.dtype)
    return t, mask_logits


class Decoder(nn.Module):
  """A stack of `DecoderLayer`s. Returns the output of every layer and every layer's mask.

  The layers run as one `nn.scan` (one compiled layer, whatever `num_layers`): their params are
  stacked under 'layers' with a leading 'layers' axis. The official checkpoints name one
  'layer_{l}' per layer: `stack_layers` / `unstack_layers` convert between the two layouts.
  """
  num_layers: int
  num_heads: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  standard_cross_attn: bool = False
  attention: str = 'xla'

  @nn.compact
  def __call__(self, t, memory, deterministic: bool):
    def body(layer, t, memory):
      t, mask = layer(t, memory, deterministic)
      return t, (t, mask)

    scan = nn.scan(
        body, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
        in_axes=nn.broadcast, length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    layer = DecoderLayer(self.num_heads, dropout_rate=self.dropout_rate,
                         standard_cross_attn=self.standard_cross_attn, attention=self.attention,
                         dtype=self.dtype, name=STACKED)
    _, (outputs, masks) = scan(layer, t, memory)
    per_layer = lambda x: [None if x is None else x[i] for i in range(self.num_layers)]
    return per_layer(outputs), per_layer(masks)


# ---------------------------------------------------------------------------------------------
# The per-layer layout of the official checkpoints and the converter's key tables.


def _layer_keys(node) -> list:
  return [k for k in node if isinstance(k, str) and re.fullmatch(r'layer_\d+', k)]


def stack_layers(head: Mapping[str, Any]) -> Dict[str, Any]:
  """Per-layer decoder params ('layer_{l}' subtrees, anywhere in a head tree) -> each
  decoder's stacked 'layers'. Leaves: numpy / jax arrays or ShapeDtypeStructs."""
  out = {}
  for key, node in head.items():
    if isinstance(node, Mapping) and _layer_keys(node):
      rest = {k: v for k, v in node.items() if k not in _layer_keys(node)}
      layers_ = [node[f'layer_{idx}'] for idx in range(len(_layer_keys(node)))]
      node = {**rest, STACKED: stacking.stack(layers_)}
    elif isinstance(node, Mapping):
      node = stack_layers(node)
    out[key] = node
  return out


def unstack_layers(head: Mapping[str, Any], num_layers: int) -> Dict[str, Any]:
  """The inverse of `stack_layers` (`num_layers`: config.model.decoder_layers)."""
  out = {}
  for key, node in head.items():
    if isinstance(node, Mapping) and isinstance(node.get(STACKED), Mapping):
      node = {**{k: v for k, v in node.items() if k != STACKED},
              **{f'layer_{idx}': layer for idx, layer in enumerate(
                  stacking.unstack(node[STACKED], num_layers))}}
    elif isinstance(node, Mapping):
      node = unstack_layers(node, num_layers)
    out[key] = node
  return out


def has_per_layer_layout(head: Mapping[str, Any]) -> bool:
  """Whether a head tree (params or a checkpoint's metadata) names one 'layer_{l}' per layer."""
  return any(isinstance(node, Mapping) and (bool(_layer_keys(node)) or has_per_layer_layout(node))
             for node in head.values())


def class_queries(module: nn.Module, num_classes: int, dim: int, batch: int, dtype) -> jnp.ndarray:
  """One learned query per class, `nn.Embedding`'s N(0, 1) init. (B, K, d)."""
  table = module.param('queries',
                       layers.partitioned(nn.initializers.normal(1.0), ('classes', 'embed')),
                       (num_classes, dim))
  return jnp.broadcast_to(table.astype(dtype), (batch, num_classes, dim))


def class_head(num_classes: int, dtype) -> nn.Dense:
  return layers.dense(num_classes + 1, 'class_embed', dtype, 'embed', 'classes')


def mask_map(mask_logits: jnp.ndarray, grid: Tuple[int, int]) -> jnp.ndarray:
  """(B, K, h*w) cross-attention logits -> (B, h, w, K) mask logits."""
  b, k, _ = mask_logits.shape
  return jnp.transpose(mask_logits, (0, 2, 1)).reshape(b, grid[0], grid[1], k).astype(jnp.float32)


class ATMHead(nn.Module):
  """The multi-stage ATM head of plain SegViT.

  `features` are the backbone taps, shallowest first; the head uses the first `use_stages` of them
  DEEPEST FIRST, carries the class queries from stage to stage, and sums the stage masks (stage
  s's mask is the sum of the last-layer masks of stages 1..s). Every stage must share one grid.
  """
  num_classes: int
  dim: int
  num_heads: int
  num_layers: int = 3
  use_stages: int = 3
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  attention: str = 'xla'

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], *, train: bool) -> List[Tuple]:
    stages = list(features[:self.use_stages])[::-1]  # as official: inputs[:use_stages], reversed
    queries = class_queries(self, self.num_classes, self.dim, stages[0].shape[0], self.dtype)
    classify = class_head(self.num_classes, self.dtype)
    predictions, mask_sum = [], 0.0
    for s, feature in enumerate(stages, start=1):
      tokens, grid = layers.map_to_tokens(feature)
      lateral = layers.dense(self.dim, f'input_proj_{s}', self.dtype, 'embed', 'mlp')(tokens)
      lateral = layers.layer_norm(f'proj_norm_{s}', HEAD_LN_EPS)(lateral).astype(self.dtype)
      outputs, masks = Decoder(self.num_layers, self.num_heads, self.dropout_rate, self.dtype,
                               attention=self.attention, name=f'decoder_{s}')(
                                   queries, lateral, not train)
      queries = outputs[-1]
      mask_sum = mask_sum + mask_map(masks[-1], grid)
      predictions.append((classify(queries).astype(jnp.float32), mask_sum))
    return predictions


class ATMSingleHead(nn.Module):
  """The single-stage ATM head of SegViT-Shrunk (official `ATMSingleHead`, use_proj=False).

  Runs one decoder over a (B, h, w, d) feature map; every layer gives a prediction with its OWN
  mask (not summed), the last one final.
  """
  num_classes: int
  num_heads: int
  num_layers: int = 3
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  attention: str = 'xla'

  @nn.compact
  def __call__(self, feature: jnp.ndarray, *, train: bool) -> List[Tuple]:
    memory, grid = layers.map_to_tokens(feature)
    dim = memory.shape[-1]
    queries = class_queries(self, self.num_classes, dim, memory.shape[0], self.dtype)
    outputs, masks = Decoder(self.num_layers, self.num_heads, self.dropout_rate, self.dtype,
                             attention=self.attention, name='decoder_1')(
                                 queries, memory, not train)
    classify = class_head(self.num_classes, self.dtype)
    return [(classify(out).astype(jnp.float32), mask_map(mask, grid))
            for out, mask in zip(outputs, masks)]
