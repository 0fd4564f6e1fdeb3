"""Plain ViT backbone as mmseg 0.24's `VisionTransformer` builds it
(`mmseg/models/backbones/vit.py`), with the optional query-based down-sampling (QD) block of
SegViT-Shrunk (official `backbone/vit_shrink.py`).

Input images are NHWC, normalised. The backbone returns the token maps tapped after the blocks in
`out_indices`, each (B, h, w, D) with its own (h, w): 1/16 of the input, 1/32 after a QD block.

Parameter layout: each run of identical plain blocks is one `nn.scan` whose parameters carry a
leading 'layers' axis, 'blocks_{first}_{last}' (inclusive): 'blocks_0_23' for ViT-L, and
'blocks_0_7', 'block_8', 'blocks_9_23' around the QD block of SegViT-Shrunk, which is a module of
its own. The official checkpoints and the key tables of `segvit_jax.convert` name one
'block_{i}' per block: `stack_blocks` / `unstack_blocks` convert between the two layouts.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax.models import resize
from segvit_jax.models import layers
from segvit_jax.models import stacking

Dtype = Any
VIT_LN_EPS = 1e-6  # mmseg's ViT builds LN with eps 1e-6; the heads use PyTorch's 1e-5.


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (and +-1 beyond, in float32): Eigen's rational
# approximation of float erf, within 5e-7 of jax.lax.erf. Written out in multiplies and adds for
# StableHLO consumers older than jax: jax serialises lax.erf as a `chlo.erf` composite, which
# TensorFlow 2.21's XlaCallModule (StableHLO 1.13) cannot read.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)
GELU_ERFS = ('lax', 'rational')


def rational_erf(x: jnp.ndarray) -> jnp.ndarray:
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = jnp.full_like(x, _ERF_P[0])
  for c in _ERF_P[1:]:
    p = p * x2 + np.asarray(c, x.dtype)
  q = jnp.full_like(x, _ERF_Q[0])
  for c in _ERF_Q[1:]:
    q = q * x2 + np.asarray(c, x.dtype)
  return x * p / q


def gelu(x: jnp.ndarray, erf: str = 'lax') -> jnp.ndarray:
  """Exact GELU as PyTorch's nn.GELU computes it, x / 2 * (1 + erf(x / sqrt(2))).

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates about 2x slower;
  the two differ by float rounding (< 1e-6). `erf`: 'lax' (jax.lax.erf) or 'rational'
  (`rational_erf`, for exports to older StableHLO readers).
  """
  erf_fn = rational_erf if erf == 'rational' else jax.lax.erf
  return 0.5 * x * (1.0 + erf_fn(x * np.asarray(0.7071067811865476, x.dtype)))


class Mlp(nn.Module):
  """Linear(D, 4D) -> exact GELU -> Linear(4D, D)."""
  hidden: int
  dtype: Dtype = jnp.float32
  gelu_erf: str = 'lax'

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    hidden = layers.dense(self.hidden, 'fc1', self.dtype, 'embed', 'mlp')(x)
    fc2 = layers.dense(channels, 'fc2', self.dtype, 'mlp', 'embed')
    # The backward pass keeps only fc1's output and recomputes GELU inside fc2's gradient
    # fusions: saving GELU's output and its erf/exp intermediates instead wrote and read back
    # three more (B, N, 4D) arrays per block (about 3 GB per step for ViT-L at 640 on a TPU).
    gelu_then = _gelu_then_rational if self.gelu_erf == 'rational' else _gelu_then
    return nn.remat(gelu_then, prevent_cse=False)(fc2, hidden)


def _gelu_then(fc2: nn.Module, hidden: jnp.ndarray) -> jnp.ndarray:
  return fc2(gelu(hidden))


def _gelu_then_rational(fc2: nn.Module, hidden: jnp.ndarray) -> jnp.ndarray:
  return fc2(gelu(hidden, 'rational'))


# Rematerialisation policies of the backbone blocks (config.model.remat): 'full' saves only each
# block's input; 'dots' also keeps the outputs of the weight matmuls (no batch dimensions: not
# the attention maps) and recomputes norms, GELU and attention.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm transformer block. Drop-path on the FFN branch only, as in mmseg 0.24.

  With `shrink`, the block performs QD: the stride-2 sub-sampled tokens (even rows and columns)
  query the full token map through the block's own attention, LN1 applied to both sides.
  Call: `(tokens (B, h*w, D), drop_path_rate (scalar or None), grid (h, w), deterministic)` ->
  tokens on `next_grid(grid)`.
  """
  num_heads: int
  mlp_ratio: int
  shrink: bool = False
  attention: str = 'xla'
  dtype: Dtype = jnp.float32
  gelu_erf: str = 'lax'

  @nn.compact
  def __call__(self, x, drop_path_rate, grid: Tuple[int, int], deterministic: bool):
    ln1 = layers.layer_norm('ln1', VIT_LN_EPS)
    attention = layers.Attention(self.num_heads, attention=self.attention, dtype=self.dtype,
                                 name='attn')
    if self.shrink:
      down = layers.tokens_to_map(x, grid)[:, ::2, ::2]
      down, _ = layers.map_to_tokens(down)
      memory = ln1(x).astype(self.dtype)
      x = down + attention(ln1(down).astype(self.dtype), memory, deterministic)[0]
    else:
      y = ln1(x).astype(self.dtype)
      x = x + attention(y, y, deterministic)[0]
    y = Mlp(self.mlp_ratio * x.shape[-1], self.dtype, self.gelu_erf, name='mlp')(
        layers.layer_norm('ln2', VIT_LN_EPS)(x).astype(self.dtype))
    return x + layers.drop_path(self, y, drop_path_rate, deterministic)


def next_grid(grid: Tuple[int, int], shrink: bool) -> Tuple[int, int]:
  return ((grid[0] + 1) // 2, (grid[1] + 1) // 2) if shrink else tuple(grid)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Blocks [start, stop) run as one scan ('blocks_{start}_{stop - 1}'), or the QD block."""
  start: int
  stop: int
  shrink: bool

  @property
  def name(self) -> str:
    return f'block_{self.start}' if self.shrink else f'blocks_{self.start}_{self.stop - 1}'


def block_segments(depth: int, shrink_index: int = -1) -> Tuple[Segment, ...]:
  """All blocks in one segment, or three around a QD block (`shrink_index` >= 0).

  Taps do not cut the stack: a scan returns every block's output, and the taps are read from
  those. One scan body per run of identical blocks is what keeps the compiled program (and its
  compile time) from growing with the number of taps as well as with depth.
  """
  cuts = {depth} | ({shrink_index, shrink_index + 1} if shrink_index >= 0 else set())
  segments, start = [], 0
  for stop in sorted(c for c in cuts if 0 < c <= depth):
    segments.append(Segment(start, stop, shrink=start == shrink_index))
    start = stop
  return tuple(segments)


def _run_segment(block: Block, segment: Segment, x, rates: Optional[np.ndarray], grid,
                 deterministic: bool, remat: str, unroll: int, keep_all: bool):
  """Runs `segment`'s blocks on x: one scan over its stacked params, or the QD block.

  Returns (x, outputs): `outputs` (n, B, N, D) holds every block's output when `keep_all`
  (taps inside the segment), else None.
  """
  policy = REMAT_POLICIES[remat]
  if segment.shrink:
    def apply(module, x, rate):
      return module(x, rate, grid, deterministic)
    if policy is not None:
      apply = nn.remat(apply, policy=policy)
    return apply(block, x, None if rates is None else rates[segment.start]), None

  def body(module, x, rate):
    x = module(x, rate, grid, deterministic)
    return x, (x if keep_all else None)

  if policy is not None:
    body = nn.remat(body, policy=policy, prevent_cse=False)  # CSE cannot cross a scan step
  scan = nn.scan(
      body, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
      length=segment.stop - segment.start, unroll=unroll,
      metadata_params={nn.PARTITION_NAME: 'layers'})
  segment_rates = None if rates is None else jnp.asarray(rates[segment.start:segment.stop])
  return scan(block, x, segment_rates)


class VisionTransformer(nn.Module):
  """mmseg 0.24 ViT without final norm and without cls token in the output.

  `img_size` fixes the stored position grid (img_size // patch_size); other input sizes get the
  grid resized with PyTorch's bicubic kernel on every call, as mmseg does at run time.
  `shrink_index` >= 0 makes that block a QD block (SegViT-Shrunk). `remat`: a key of
  REMAT_POLICIES. `attention`: a `models.attention` implementation. `scan_unroll`: blocks per
  iteration of each segment's scan. `gelu_erf`: one of GELU_ERFS (see `gelu`).
  """
  img_size: Tuple[int, int]
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  out_indices: Sequence[int] = (5, 7, 11)
  drop_path_rate: float = 0.1
  shrink_index: int = -1
  remat: str = 'none'
  attention: str = 'xla'
  scan_unroll: int = 1
  dtype: Dtype = jnp.float32
  gelu_erf: str = 'lax'

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images (B, H, W, 3) -> tuple of (B, h_i, w_i, D) maps, one per out index."""
    p = self.patch_size
    b, height, width, _ = images.shape
    # mmseg's 'corner' adaptive padding: zeros at the bottom/right up to a multiple of the patch.
    pad_h, pad_w = -height % p, -width % p
    if pad_h or pad_w:
      images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    x = nn.Conv(
        self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
        name='patch_embed',
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
        bias_init=layers.partitioned(layers.zeros, ('embed',)))(images.astype(self.dtype))
    x, grid = layers.map_to_tokens(x)

    stored_grid = (self.img_size[0] // p, self.img_size[1] // p)
    pos_embed = self.param(
        'pos_embed', layers.partitioned(layers.trunc_normal_02, (None, None, 'embed')),
        (1, 1 + stored_grid[0] * stored_grid[1], self.embed_dim))
    # Held for checkpoint compatibility only: mmseg concatenates the cls token and drops it again
    # (with_cls_token=False), so neither it nor pos_embed[:, 0] reaches the output.
    self.param('cls_token', layers.partitioned(layers.trunc_normal_02, (None, None, 'embed')),
               (1, 1, self.embed_dim))
    pos = pos_embed[:, 1:].reshape(1, *stored_grid, self.embed_dim)
    pos = resize.resize_bicubic_torch(pos, grid)
    x = x + pos.reshape(1, -1, self.embed_dim).astype(x.dtype)

    # mmseg's dpr = linspace(0, drop_path_rate, depth); None: no drop path at all.
    rates = (np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)
             if self.drop_path_rate > 0 else None)
    outputs = []
    for segment in block_segments(self.depth, self.shrink_index):
      block = Block(self.num_heads, self.mlp_ratio, shrink=segment.shrink,
                    attention=self.attention, dtype=self.dtype, gelu_erf=self.gelu_erf,
                    name=segment.name)
      taps = [i for i in self.out_indices if segment.start <= i < segment.stop]
      x, every = _run_segment(block, segment, x, rates, grid, not train, self.remat,
                              self.scan_unroll, keep_all=any(i < segment.stop - 1 for i in taps))
      grid = next_grid(grid, segment.shrink)
      for i in taps:
        tap = layers.tokens_to_map(x if i == segment.stop - 1 else every[i - segment.start], grid)
        self.sow('intermediates', f'tap_{i}', tap)
        outputs.append(tap)
    return tuple(outputs)


# ---------------------------------------------------------------------------------------------
# The per-block layout of the official checkpoints and the converter's key tables.


def segments_of(model_config: ml_collections.ConfigDict) -> Tuple[Segment, ...]:
  shrink = model_config.shrink_index if model_config.name == 'segvit_shrunk' else -1
  return block_segments(model_config.depth, shrink)


def stack_blocks(backbone: Mapping[str, Any],
                 model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Per-block backbone params ('block_{i}' subtrees) -> the model's stacked segments.

  Leaves: numpy / jax arrays or ShapeDtypeStructs (see `models.stacking`); the other entries
  (patch_embed, pos_embed, cls_token, the QD block) pass through.
  """
  out = dict(backbone)
  for segment in segments_of(model_config):
    if not segment.shrink:
      out[segment.name] = stacking.stack(
          [out.pop(f'block_{i}') for i in range(segment.start, segment.stop)])
  return out


def unstack_blocks(backbone: Mapping[str, Any],
                   model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The inverse of `stack_blocks`: one 'block_{i}' subtree per block."""
  out = dict(backbone)
  for segment in segments_of(model_config):
    if not segment.shrink:
      blocks = stacking.unstack(out.pop(segment.name), segment.stop - segment.start)
      out.update({f'block_{segment.start + j}': b for j, b in enumerate(blocks)})
  return out


def has_per_block_layout(backbone: Mapping[str, Any],
                         model_config: ml_collections.ConfigDict) -> bool:
  """Whether a backbone tree (params, or a checkpoint's metadata tree with the same keys) holds
  one 'block_{i}' per scanned block, as checkpoints written before the blocks were scanned do."""
  return any(f'block_{i}' in backbone for s in segments_of(model_config) if not s.shrink
             for i in range(s.start, s.stop))
