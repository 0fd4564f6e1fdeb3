"""Building blocks shared by the backbone and the heads: attention, MLPs, drop-path, initialisers.

Token layout everywhere: (B, N, C) with N = h * w flattened row-major (h first), as PyTorch's
`flatten(2).transpose(1, 2)` does. Parameter names follow the official modules so that the
converter's key table reads one-to-one (the official state-dict keys).
"""

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import attention as attention_lib
from segvit_jax.models import tpu_dropout_attention

Dtype = Any

# Official head init (`decode_heads/atm_head.py`, `init_weights`): Linear trunc-normal std 0.02
# (bounds +-2 absolute), bias 0.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)
zeros = nn.initializers.zeros


def partitioned(init, names):
  """Attaches logical axis names (see `segvit_jax.sharding`) to an initialiser."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, name: str, dtype: Dtype, in_axis='embed', out_axis='mlp') -> nn.Dense:
  return nn.Dense(
      features, dtype=dtype, name=name,
      kernel_init=partitioned(trunc_normal_02, (in_axis, out_axis)),
      bias_init=partitioned(zeros, (out_axis,)))


def layer_norm(name: str, eps: float) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype: bf16 variance is too coarse at D = 1024.
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.float32, name=name,
      scale_init=partitioned(nn.initializers.ones, ('norm',)),
      bias_init=partitioned(zeros, ('norm',)))


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections and an output projection.

  One module serves the ViT blocks (torch `nn.MultiheadAttention`, whose stacked `in_proj` the
  converter splits into q/k/v), the decoders' self-attention, and the ATM cross-attention (the
  official `Attention` with `q`, `k`, `v`, `proj`).

  Call: `(queries (B, Nq, C), keys_values (B, Nk, C), deterministic)` ->
  `(out (B, Nq, C), mask_logits (B, Nq, Nk) or None)`. With `return_mask_logits`, the second output
  is the head-averaged PRE-softmax logits, the ATM mask (official `atm_head.py`, `Attention`).
  `attention` names the softmax(q k^T) v implementation (`models.attention`). Dropout on the
  attention weights needs the weights themselves: on TPU a kernel of ours computes them in VMEM
  (`tpu_dropout_attention`); elsewhere a training step with dropout computes them explicitly
  whatever `attention` says.
  """
  num_heads: int
  dropout_rate: float = 0.0
  return_mask_logits: bool = False
  kernel_init: Any = trunc_normal_02
  attention: str = 'xla'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys_values, deterministic: bool):
    channels = queries.shape[-1]
    if channels % self.num_heads:
      raise ValueError(f'Attention width {channels} is not divisible by '
                       f'num_heads={self.num_heads}.')
    head_dim = channels // self.num_heads

    def projection(name):
      return nn.DenseGeneral(
          (self.num_heads, head_dim), dtype=self.dtype, name=name,
          kernel_init=partitioned(self.kernel_init, ('embed', 'heads', 'kv')),
          bias_init=partitioned(zeros, ('heads', 'kv')))

    q = projection('query')(queries)  # (B, Nq, H, hd)
    k = projection('key')(keys_values)
    v = projection('value')(keys_values)
    scale = head_dim ** -0.5
    dropout = self.dropout_rate > 0.0 and not deterministic
    if (dropout and self.attention == 'pallas_tpu'
        and k.shape[1] <= tpu_dropout_attention.MAX_KEYS):
      seeds = attention_lib.dropout_seeds(self.make_rng('dropout'), q.shape[0], self.num_heads)
      out = attention_lib.attend_dropout_pallas_tpu(
          q * jnp.asarray(scale, q.dtype), k, v, seeds, self.dropout_rate)
    elif dropout:
      # Only q, k and v are kept for the backward pass, which recomputes the maps (the dropout
      # mask from the same key): saved, the logits, weights and mask of every layer were
      # written and read back, 4 (B, H, Nq, Nk) arrays per layer.
      attend = functools.partial(_dropout_attention, scale=scale, dtype=self.dtype)
      out = nn.remat(attend, prevent_cse=False)(
          Dropout(self.dropout_rate), q, k, v)
    else:
      out = attention_lib.attend(q * jnp.asarray(scale, q.dtype), k, v, self.attention)
    out = nn.DenseGeneral(
        channels, axis=(-2, -1), dtype=self.dtype, name='out',
        kernel_init=partitioned(trunc_normal_02, ('heads', 'kv', 'embed')),
        bias_init=partitioned(zeros, ('embed',)))(out)
    mask_logits = None
    if self.return_mask_logits:
      # The head average of the scaled per-head logits is one contraction over all heads and
      # channels: (B, Nq, Nk) directly, without the (B, H, Nq, Nk) maps and their reduction.
      # So the value path above needs no explicit logits either and takes the fused kernel:
      # sharing logits with it would bring back the per-head maps the kernel avoids.
      mask_logits = jnp.einsum('bqhd,bkhd->bqk', q, k) * (scale / self.num_heads)
    return out, mask_logits


def _dropout_attention(dropout: nn.Module, q, k, v, *, scale: float, dtype) -> jnp.ndarray:
  """softmax(q k^T * scale) with dropout on the weights, times v: (B, Nq, H, hd)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', dropout(weights, deterministic=False), v)


class Dropout(nn.Module):
  """Inverted dropout of x (B, ..., C), as `nn.Dropout` computes it (x / (1 - rate) where kept),
  with a counter-based mask: `tpu_dropout_attention.keep_mask` of each element's (position, channel)
  under a per-example seed from the rng stream 'dropout' (a new one at every call).

  Why not `nn.Dropout`: its threefry bits cost ~100 integer ops per element, fused into the
  residual and LayerNorm fusions around them; for the 1600-query decoders of SegViT-Shrunk those
  fusions took XLA:TPU about a minute of compile time each. The hash is 8 ops. The mask of an
  element depends only on its global index, so it is the same under any sharding.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)
    seeds = attention_lib.dropout_seeds(self.make_rng('dropout'), b, 1)[:, :, None]  # (B, 1, 1)
    rows = jax.lax.broadcasted_iota(jnp.int32, flat.shape, 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, flat.shape, 2)
    keep = tpu_dropout_attention.keep_mask(seeds, rows, cols, c, self.rate)
    kept = jnp.where(keep, flat / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(flat))
    return kept.reshape(x.shape)


def drop_path(module: nn.Module, x: jnp.ndarray, rate, deterministic: bool) -> jnp.ndarray:
  """Stochastic depth: drops the whole residual branch per example (rng stream 'dropout').

  `rate` may be traced (a scanned per-block input); None means no drop path at all. A rate of 0
  keeps every example (the Bernoulli draw is always 1) and returns x unchanged.
  """
  if deterministic or rate is None:
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def tokens_to_map(tokens: jnp.ndarray, grid: Tuple[int, int]) -> jnp.ndarray:
  """(B, h*w, C) -> (B, h, w, C), rows first."""
  b, n, c = tokens.shape
  h, w = grid
  if n != h * w:
    raise ValueError(f'{n} tokens cannot form a {h}x{w} grid.')
  return tokens.reshape(b, h, w, c)


def map_to_tokens(x: jnp.ndarray) -> Tuple[jnp.ndarray, Tuple[int, int]]:
  """(B, h, w, C) -> ((B, h*w, C), (h, w))."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w, c), (h, w)
