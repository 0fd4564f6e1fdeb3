"""Attention with dropout on its weights as Pallas TPU kernels, forward and backward.

The heads drop attention weights in training (torch `nn.MultiheadAttention(dropout=0.1)` inside
`TransformerDecoderLayer`, the official `atm_head.py` `Attention` with `attn_drop`). Written in XLA,
that is (B, H, Nq, Nk) logits, weights and a mask in HBM, forward and again in the backward pass:
at 640 the Shrunk model's QU decoders (1600 x 1600 maps, 16 heads, 6 layers) spend most of a train
step's HBM traffic on them. Here one grid step holds a block of BLOCK_Q query rows against all the
keys in VMEM, so the softmax is exact over the whole row (no running maximum), and the dropout
mask is a hash of (seed, row, column) that the backward kernel recomputes: only q, k, v, the
output and their gradients go through HBM.

Layout (kernel side): q (B, H, Lq, hd) with the softmax scale folded in, k, v (B, H, Lk, hd),
Lq a multiple of BLOCK_Q and Lk of 128 (`attention.dropout_flash_tpu` pads and masks); seeds
(B * H,) int32, one per example and head.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK_Q = 128
# The kernels' names in compiled programs (the custom calls' metadata).
FORWARD_NAME = 'segvit_dropout_attention_fwd'
BACKWARD_NAME = 'segvit_dropout_attention_bwd'
# The backward kernel's (BLOCK_Q, Lk) float32 maps and resident dk, dv must fit in VMEM: at 2048
# keys both kernels compile for v4, v5e and v6e chips in float32 and bfloat16; at 4096, v4 runs
# out of VMEM. Longer key sequences take the XLA path.
MAX_KEYS = 2048
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_TRANS_B = (((1,), (1,)), ((), ()))

# murmur3's 32-bit finaliser and the golden-ratio step, as int32 (the products wrap as uint32's).
_GOLDEN = np.int32(0x9E3779B1 - (1 << 32))
_MIX1 = np.int32(0x85EBCA6B - (1 << 32))
_MIX2 = np.int32(0xC2B2AE35 - (1 << 32))
_KEEP_BITS = 24


def keep_threshold(rate: float) -> int:
  """A weight survives when the top 24 bits of its hash are at least this."""
  return int(round(rate * (1 << _KEEP_BITS)))


def keep_mask(seed, rows, cols, width: int, rate: float) -> jnp.ndarray:
  """Whether attention weight (row, col) survives dropout (True with probability 1 - rate).

  seed: int32 scalar; rows, cols: int32 arrays that broadcast; width: Lk, the padded key count.
  The hash is murmur3's finaliser of (row * width + col) * golden + seed in uint32 arithmetic,
  done in int32 (TPU vector units have no unsigned multiply; the wrapped bits are the same).
  """
  x = (rows * width + cols) * _GOLDEN + seed
  x = x ^ lax.shift_right_logical(x, 16)
  x = x * _MIX1
  x = x ^ lax.shift_right_logical(x, 13)
  x = x * _MIX2
  x = x ^ lax.shift_right_logical(x, 16)
  return lax.shift_right_logical(x, 32 - _KEEP_BITS) >= keep_threshold(rate)


def _block_maps(seeds_ref, q, k, *, nk: int, rate: float, heads: int):
  """Logits (BLOCK_Q, Lk) float32 of this grid step, padded keys masked, and its keep mask."""
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  logits = lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32)
  cols = lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  if nk < k.shape[0]:
    logits = jnp.where(cols < nk, logits, _MASK_VALUE)
  rows = i * BLOCK_Q + lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  keep = keep_mask(seeds_ref[b * heads + h], rows, cols, k.shape[0], rate)
  return logits, keep


def _forward_kernel(seeds_ref, q_ref, k_ref, v_ref, o_ref, *, nk, rate, heads):
  v = v_ref[0, 0]
  logits, keep = _block_maps(seeds_ref, q_ref[0, 0], k_ref[0, 0], nk=nk, rate=rate, heads=heads)
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  total = jnp.sum(unnormalised, axis=1, keepdims=True)
  kept = jnp.where(keep, unnormalised, 0.0).astype(v.dtype)
  # Normalising the (BLOCK_Q, hd) output rather than the (BLOCK_Q, Lk) weights saves a pass.
  out = lax.dot(kept, v, preferred_element_type=jnp.float32) / (total * (1.0 - rate))
  o_ref[0, 0] = out.astype(o_ref.dtype)


def _backward_kernel(seeds_ref, q_ref, k_ref, v_ref, o_ref, do_ref, dq_ref, dk_ref, dv_ref, *,
                     nk, rate, heads):
  """dq for this query block; dk, dv (float32) summed over the query blocks (the last grid axis,
  sequential): with W = softmax(S) and D the scaled mask, O = (D W) V, so dV = (D W)^T dO and
  dS = W * (D * dO V^T - rowsum(dO * O))."""
  @pl.when(pl.program_id(2) == 0)
  def _():
    dk_ref[...] = jnp.zeros_like(dk_ref)
    dv_ref[...] = jnp.zeros_like(dv_ref)

  q, k, v, out, d_out = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], o_ref[0, 0], do_ref[0, 0]
  logits, keep = _block_maps(seeds_ref, q, k, nk=nk, rate=rate, heads=heads)
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  weights = unnormalised * (1.0 / jnp.sum(unnormalised, axis=1, keepdims=True))
  scale = 1.0 / (1.0 - rate)
  dropped = jnp.where(keep, weights * scale, 0.0)
  dv_ref[0, 0] += lax.dot(dropped.T.astype(d_out.dtype), d_out,
                          preferred_element_type=jnp.float32)
  d_dropped = lax.dot_general(d_out, v, _TRANS_B, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=1, keepdims=True)
  d_logits = weights * (jnp.where(keep, d_dropped * scale, 0.0) - row_dot)
  dq_ref[0, 0] = lax.dot(d_logits.astype(k.dtype), k,
                         preferred_element_type=jnp.float32).astype(dq_ref.dtype)
  dk_ref[0, 0] += lax.dot(d_logits.T.astype(q.dtype), q, preferred_element_type=jnp.float32)


def _specs(q, k):
  head_dim = q.shape[-1]
  rows = pl.BlockSpec((1, 1, BLOCK_Q, head_dim), lambda b, h, i, seeds: (b, h, i, 0))
  whole = pl.BlockSpec((1, 1, k.shape[2], head_dim), lambda b, h, i, seeds: (b, h, 0, 0))
  return rows, whole


def _cost(q, k, matmuls: int, arrays) -> pl.CostEstimate:
  batch, heads, lq, head_dim = q.shape
  cells = batch * heads * lq * k.shape[2]
  return pl.CostEstimate(flops=2 * matmuls * cells * head_dim, transcendentals=cells,
                         bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays))


def _call(kernel, name, q, k, out_shape, in_specs, out_specs, query_axis, matmuls, args):
  """One pallas_call over the grid (B, H, Lq / BLOCK_Q), seeds as its scalar prefetch."""
  batch, heads, lq, _ = q.shape
  return pl.pallas_call(
      kernel, name=name, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(batch, heads, lq // BLOCK_Q),
          in_specs=in_specs, out_specs=out_specs),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', query_axis)),
      cost_estimate=_cost(q, k, matmuls, args[1:] + tuple(jax.tree.leaves(out_shape))),
  )(*args)


def _forward(q, k, v, seeds, nk, rate):
  rows, whole = _specs(q, k)
  return _call(functools.partial(_forward_kernel, nk=nk, rate=rate, heads=q.shape[1]),
               FORWARD_NAME, q, k, jax.ShapeDtypeStruct(q.shape, v.dtype), [rows, whole, whole],
               rows, 'parallel', 2, (seeds, q, k, v))


def _backward(q, k, v, out, d_out, seeds, nk, rate):
  rows, whole = _specs(q, k)
  out_shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct(k.shape, jnp.float32),
                jax.ShapeDtypeStruct(v.shape, jnp.float32))
  # dk and dv are summed over the query blocks: that grid axis runs in order.
  return _call(functools.partial(_backward_kernel, nk=nk, rate=rate, heads=q.shape[1]),
               BACKWARD_NAME, q, k, out_shapes, [rows, whole, whole, rows, rows],
               [rows, whole, whole], 'arbitrary', 5, (seeds, q, k, v, out, d_out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def dropout_attention(q, k, v, seeds, nk: int, rate: float):
  """softmax(q k^T) with dropout(rate) on the weights, times v, in the kernel layout (see the
  module docstring); keys at and past `nk` are padding and get no weight. Returns (B, H, Lq, hd)
  in v's dtype."""
  return _forward(q, k, v, seeds, nk, rate)


def _dropout_attention_fwd(q, k, v, seeds, nk, rate):
  out = _forward(q, k, v, seeds, nk, rate)
  return out, (q, k, v, seeds, out)


def _dropout_attention_bwd(nk, rate, residuals, d_out):
  q, k, v, seeds, out = residuals
  d_q, d_k, d_v = _backward(q, k, v, out, d_out, seeds, nk, rate)
  return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


dropout_attention.defvjp(_dropout_attention_fwd, _dropout_attention_bwd)
