"""Building blocks shared by the backbone and the heads: attention, MLPs, drop-path, initialisers.

Token layout everywhere: (B, N, C) with N = h * w flattened row-major (h first), as PyTorch's
`flatten(2).transpose(1, 2)` does. Parameter names follow the official modules so that the
converter's key table reads one-to-one (reference sections 9.2-9.4).
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Official head init (reference 6.6): Linear trunc-normal std 0.02 (bounds +-2 absolute), bias 0.
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
  is the head-averaged PRE-softmax logits, the ATM mask (reference 3.2).
  """
  num_heads: int
  dropout_rate: float = 0.0
  return_mask_logits: bool = False
  kernel_init: Any = trunc_normal_02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys_values, deterministic: bool):
    channels = queries.shape[-1]
    if channels % self.num_heads:
      raise ValueError(f'Attention width {channels} is not divisible by num_heads={self.num_heads}.')
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
    if self.dropout_rate > 0.0 and not deterministic:  # the weights themselves are needed
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * scale
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    else:
      out = attend(q * jnp.asarray(scale, q.dtype), k, v)
    out = nn.DenseGeneral(
        channels, axis=(-2, -1), dtype=self.dtype, name='out',
        kernel_init=partitioned(trunc_normal_02, ('heads', 'kv', 'embed')),
        bias_init=partitioned(zeros, ('embed',)))(out)
    mask_logits = None
    if self.return_mask_logits:
      # The head average of the scaled per-head logits is one contraction over all heads and
      # channels: (B, Nq, Nk) directly, without the (B, H, Nq, Nk) maps and their reduction.
      mask_logits = jnp.einsum('bqhd,bkhd->bqk', q, k) * (scale / self.num_heads)
    return out, mask_logits


# Attention maps at least this large (Nq * Nk) take the per-head path on CPU.
PER_HEAD_MIN_SIZE = 256 * 256


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T) v for each head: q (B, Nq, H, hd) already scaled, k, v (B, Nk, H, hd).

  On CPU, large maps go head by head (`attend_per_head`): each (Nq, Nk) map then stays in cache,
  which makes the ViT's attention about 2x faster forward and 1.7x forward + backward on CPU
  (bench/throughput.py) and keeps the maps out of the saved activations. Elsewhere (GPU, TPU)
  the batched form lets XLA fuse it. Softmax statistics are float32 in both.
  """
  if jax.default_backend() == 'cpu' and q.shape[1] * k.shape[1] >= PER_HEAD_MIN_SIZE:
    return attend_per_head(q, k, v)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _by_head(x):
  """(B, N, H, hd) -> (B * H, N, hd)."""
  b, n, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _from_heads(x, batch):
  """(B * H, N, hd) -> (B, N, H, hd)."""
  bh, n, d = x.shape
  return x.reshape(batch, bh // batch, n, d).transpose(0, 2, 1, 3)


@jax.custom_vjp
def attend_per_head(q, k, v):
  """`attend` as a loop over batch x heads, with a backward pass that recomputes each map from
  q, k and the saved log-sum-exp instead of storing all maps (the flash-attention recurrence)."""
  return _attend_per_head_fwd(q, k, v)[0]


def _attend_per_head_fwd(q, k, v):
  qh, kh, vh = _by_head(q), _by_head(k), _by_head(v)

  def one_head(args):
    qi, ki, vi = args
    logits = jnp.dot(qi, ki.T, preferred_element_type=jnp.float32)
    peak = logits.max(axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - peak)
    total = unnormalised.sum(axis=-1, keepdims=True)
    # Normalising the (Nq, hd) output instead of the (Nq, Nk) weights saves a pass over the map.
    out = jnp.dot(unnormalised.astype(vi.dtype), vi, preferred_element_type=jnp.float32) / total
    return out.astype(vi.dtype), (peak + jnp.log(total))[:, 0]

  out, logsumexp = jax.lax.map(one_head, (qh, kh, vh))
  return _from_heads(out, q.shape[0]), (qh, kh, vh, out, logsumexp)


def _attend_per_head_bwd(residuals, d_out):
  qh, kh, vh, out, logsumexp = residuals
  batch = d_out.shape[0]
  d_outh = _by_head(d_out)
  # d softmax: dS = P * (dP - rowsum(dO * O)); the row sums once for all heads.
  row_dot = jnp.sum(d_outh.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def one_head(args):
    qi, ki, vi, doi, lse, rd = args
    weights = jnp.exp(jnp.dot(qi, ki.T, preferred_element_type=jnp.float32) - lse[:, None])
    d_v = jnp.dot(weights.T.astype(doi.dtype), doi)
    d_weights = jnp.dot(doi, vi.T, preferred_element_type=jnp.float32)
    d_logits = (weights * (d_weights - rd[:, None])).astype(qi.dtype)
    return jnp.dot(d_logits, ki), jnp.dot(d_logits.T, qi), d_v

  d_q, d_k, d_v = jax.lax.map(one_head, (qh, kh, vh, d_outh, logsumexp, row_dot))
  return _from_heads(d_q, batch), _from_heads(d_k, batch), _from_heads(d_v, batch)


attend_per_head.defvjp(_attend_per_head_fwd, _attend_per_head_bwd)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (rng stream 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


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


def cast(x: Optional[jnp.ndarray], dtype: Dtype):
  return None if x is None else x.astype(dtype)
