"""softmax(q k^T) v per head, in the form that suits the hardware the step runs on.

Every implementation takes q (B, Nq, H, hd), already multiplied by the softmax scale, and
k, v (B, Nk, H, hd), and returns (B, Nq, H, hd) in v's dtype; softmax statistics are float32.

  'xla'         the batched einsum + softmax; XLA materialises the (B, H, Nq, Nk) maps.
  'per_head'    CPU: large maps head by head, with a backward that recomputes each map from the
                saved log-sum-exp (`attend_per_head`); small maps batched as 'xla'.
  'pallas_tpu'  TPU: the Pallas flash-attention kernel (`jax.experimental.pallas.ops.tpu`);
                token counts padded to its block, padded keys masked out. With dropout on
                the weights (the heads in training): our kernel (`tpu_dropout_attention`).
  'cudnn'       GPU: cuDNN's fused flash attention (`jax.nn.dot_product_attention`), bfloat16.

`resolve_attention` turns `config.model.attention` ('auto' or one of these) into the one a step
on a given platform uses.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.sharding import PartitionSpec as P

from segvit_jax import sharding
from segvit_jax.errors import UserError
from segvit_jax.models import tpu_dropout_attention

IMPLEMENTATIONS = ('xla', 'per_head', 'pallas_tpu', 'cudnn')
CHOICES = ('auto',) + IMPLEMENTATIONS


def resolve_attention(name: str, platform: str, dtype: str = 'float32') -> str:
  """The implementation (one of IMPLEMENTATIONS) that `name` means for a step on `platform`.

  Args:
    name: config.model.attention: 'auto' or one of IMPLEMENTATIONS.
    platform: the platform of the devices the step runs on (`device.platform`: 'cpu', 'tpu',
      'gpu'; 'cuda' / 'rocm' as jax's backend names spell them).
    dtype: config.model.dtype; cuDNN's flash attention takes bfloat16 / float16 only.

  'auto' picks the Pallas kernel on TPU, cuDNN on NVIDIA GPUs in bfloat16, the per-head loop on
  CPU and the batched XLA form elsewhere. Raises UserError for an unknown name or an explicit
  choice the platform cannot run.
  """
  if name not in CHOICES:
    raise UserError(f'config.model.attention={name!r} is not one of {", ".join(CHOICES)}.')
  nvidia = platform in ('gpu', 'cuda')
  if name == 'auto':
    if platform == 'tpu':
      return 'pallas_tpu'
    if nvidia and dtype == 'bfloat16':
      return 'cudnn'
    return 'per_head' if platform == 'cpu' else 'xla'
  if name == 'pallas_tpu' and platform != 'tpu':
    raise UserError(f"config.model.attention='pallas_tpu' needs TPU devices, the step runs on "
                    f"{platform!r}; use 'auto', 'xla' or 'per_head'.")
  if name == 'cudnn' and not nvidia:
    raise UserError(f"config.model.attention='cudnn' needs NVIDIA GPUs, the step runs on "
                    f"{platform!r}; use 'auto' or 'xla'.")
  if name == 'cudnn' and dtype != 'bfloat16':
    raise UserError(f"config.model.attention='cudnn' needs config.model.dtype='bfloat16' (cuDNN "
                    f"flash attention has no {dtype}); use 'auto' or 'xla'.")
  return name


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
           implementation: str = 'xla') -> jnp.ndarray:
  """softmax(q k^T) v for each head with the given implementation (see the module docstring)."""
  if implementation == 'xla':
    return attend_xla(q, k, v)
  if implementation == 'per_head':
    if q.shape[1] * k.shape[1] >= PER_HEAD_MIN_SIZE:
      return attend_per_head(q, k, v)
    return attend_xla(q, k, v)
  if implementation == 'pallas_tpu':
    return attend_pallas_tpu(q, k, v)
  if implementation == 'cudnn':
    return attend_cudnn(q, k, v)
  raise ValueError(f'Unknown attention implementation {implementation!r}.')


def attend_xla(q, k, v):
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


# ---------------------------------------------------------------------------------------------
# CPU: head by head.

# Attention maps at least this large (Nq * Nk) go head by head; smaller ones batched.
PER_HEAD_MIN_SIZE = 256 * 256


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
  """`attend_xla` as a loop over batch x heads, with a backward pass that recomputes each map
  from q, k and the saved log-sum-exp instead of storing all maps (the flash-attention
  recurrence). Each (Nq, Nk) map then stays in cache, which makes the ViT's attention about 2x
  faster forward and 1.7x forward + backward on CPU (bench/throughput.py)."""
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


# ---------------------------------------------------------------------------------------------
# TPU: the Pallas flash-attention kernel.

TPU_LANES = 128  # the kernel's sequence blocks are multiples of this
TPU_MAX_BLOCK = 512


def tpu_padded_length(n: int) -> int:
  """Tokens padded up to a whole number of the kernel's smallest block."""
  return -(-n // TPU_LANES) * TPU_LANES


def tpu_block(padded: int) -> int:
  """The largest block of at most TPU_MAX_BLOCK rows that divides a padded length."""
  return max(b for b in range(TPU_LANES, TPU_MAX_BLOCK + 1, TPU_LANES) if padded % b == 0)


def flash_tpu(q, k, v):
  """The kernel on one device's shard: q (B, Nq, H, hd) scaled, k, v (B, Nk, H, hd).

  Queries and keys are zero-padded to multiples of 128. Padded keys get their own segment id,
  so no query attends to them (they get zero weight); padded queries attend to the real keys
  and are sliced away, so every softmax row has real entries and the backward pass sees zero
  cotangents for them.
  """
  nq, nk = q.shape[1], k.shape[1]
  lq, lk = tpu_padded_length(nq), tpu_padded_length(nk)
  to_kernel = lambda x, length: jnp.pad(
      x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))
  segment_ids = None
  if lk != nk:
    batch = q.shape[0]
    segment_ids = tpu_flash.SegmentIds(
        q=jnp.zeros((batch, lq), jnp.int32),
        kv=jnp.broadcast_to((jnp.arange(lk) >= nk).astype(jnp.int32), (batch, lk)))
  bq, bk = tpu_block(lq), tpu_block(lk)
  blocks = tpu_flash.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
      block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  out = tpu_flash.flash_attention(
      to_kernel(q, lq), to_kernel(k, lk), to_kernel(v, lk), segment_ids=segment_ids,
      sm_scale=1.0, block_sizes=blocks)
  return out[:, :, :nq].transpose(0, 2, 1, 3).astype(v.dtype)


def _shard_axes(mesh, names, size):
  """The mesh axes among `names` whose product divides `size` (greedy, in order)."""
  kept, product = [], 1
  for name in names:
    if name in mesh.axis_names and size % (product * mesh.shape[name]) == 0:
      kept.append(name)
      product *= mesh.shape[name]
  return tuple(kept) or None


def attend_pallas_tpu(q, k, v):
  """`flash_tpu` on each device's part of the batch (and of the heads, over 'model')."""
  return _per_shard(flash_tpu, q, k, v)


def dropout_flash_tpu(q, k, v, seeds, rate: float):
  """`attend` with dropout(rate) on the weights, on one device's shard: q (B, Nq, H, hd) scaled,
  k, v (B, Nk, H, hd), seeds (B, H) int32 (`dropout_seeds`). Queries are padded to the kernel's
  block, keys to 128 and masked (`tpu_dropout_attention`)."""
  nq, nk = q.shape[1], k.shape[1]
  block = tpu_dropout_attention.BLOCK_Q
  lq, lk = -(-nq // block) * block, tpu_padded_length(nk)
  to_kernel = lambda x, length: jnp.pad(
      x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))
  out = tpu_dropout_attention.dropout_attention(
      to_kernel(q, lq), to_kernel(k, lk), to_kernel(v, lk), seeds.reshape(-1), nk, rate)
  return out[:, :, :nq].transpose(0, 2, 1, 3)


def attend_dropout_pallas_tpu(q, k, v, seeds, rate: float):
  """`dropout_flash_tpu` on each device's part of the batch (and of the heads)."""
  return _per_shard(functools.partial(dropout_flash_tpu, rate=rate), q, k, v, seeds=seeds)


def dropout_seeds(key, batch: int, heads: int) -> jnp.ndarray:
  """(batch, heads) int32 seeds of the kernel's dropout masks, from a PRNG key."""
  return jax.lax.bitcast_convert_type(jax.random.bits(key, (batch, heads), jnp.uint32),
                                      jnp.int32)


def _per_shard(kernel, q, k, v, seeds=None):
  """kernel(q, k, v[, seeds]) on each device's part of the batch (and of the heads, 'model').

  XLA cannot partition a Mosaic kernel itself, so under a mesh (`jax.set_mesh`, which callers
  trace the step under) the kernel runs inside `shard_map`. Without a mesh it is called as is
  (one device).
  """
  args = (q, k, v) if seeds is None else (q, k, v, seeds)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(*args)
  batch_axes = _shard_axes(mesh, sharding.BATCH_AXES, q.shape[0])
  head_axes = _shard_axes(mesh, ('model',), q.shape[2])
  spec = P(batch_axes, None, head_axes, None)
  specs = (spec,) * 3 + (() if seeds is None else (P(batch_axes, head_axes),))
  return jax.shard_map(kernel, in_specs=specs, out_specs=spec, check_vma=False)(*args)


# ---------------------------------------------------------------------------------------------
# GPU: cuDNN.


def attend_cudnn(q, k, v, implementation: str = 'cudnn'):
  """cuDNN's flash attention; `implementation='xla'` runs the same call through XLA (tests)."""
  return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
