"""Plain ViT backbone as mmseg 0.24's `VisionTransformer` builds it (reference section 2), with the
optional query-based down-sampling (QD) block of SegViT-Shrunk (reference 4.1).

Input images are NHWC, normalised. The backbone returns the token maps tapped after the blocks in
`out_indices`, each (B, h, w, D) with its own (h, w): 1/16 of the input, 1/32 after a QD block.

Parameter layout: the taps and the QD block cut the blocks into segments of identical plain
blocks, each run as one `nn.scan` whose parameters carry a leading 'layers' axis:
'blocks_{first}_{last}' (inclusive). The QD block is a module of its own, 'block_{i}'. The
official checkpoints and the key tables of `segvit_jax.convert` name one 'block_{i}' per
block: `stack_blocks` / `unstack_blocks` convert between the two layouts.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax import resize
from segvit_jax.models import layers

Dtype = Any
VIT_LN_EPS = 1e-6  # mmseg's ViT builds LN with eps 1e-6; the heads use PyTorch's 1e-5.


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """Exact GELU as PyTorch's nn.GELU computes it, x / 2 * (1 + erf(x / sqrt(2))).

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates about 2x slower;
  the two differ by float rounding (< 1e-6).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))


class Mlp(nn.Module):
  """Linear(D, 4D) -> exact GELU -> Linear(4D, D)."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = layers.dense(self.hidden, 'fc1', self.dtype, 'embed', 'mlp')(x)
    x = gelu(x)
    return layers.dense(channels, 'fc2', self.dtype, 'mlp', 'embed')(x)


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
    y = Mlp(self.mlp_ratio * x.shape[-1], self.dtype, name='mlp')(
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


def block_segments(depth: int, out_indices: Sequence[int],
                   shrink_index: int = -1) -> Tuple[Segment, ...]:
  """The blocks cut after every tap and around the QD block (`shrink_index` >= 0)."""
  cuts = {depth} | {i + 1 for i in out_indices}
  if shrink_index >= 0:
    cuts |= {shrink_index, shrink_index + 1}
  segments, start = [], 0
  for stop in sorted(c for c in cuts if 0 < c <= depth):
    segments.append(Segment(start, stop, shrink=start == shrink_index))
    start = stop
  return tuple(segments)


def _run_segment(block: Block, segment: Segment, x, rates: Optional[np.ndarray], grid,
                 deterministic: bool, remat: str, unroll: int):
  """Runs `segment`'s blocks on x: one scan over its stacked params, or the QD block."""
  policy = REMAT_POLICIES[remat]
  if segment.shrink:
    def apply(module, x, rate):
      return module(x, rate, grid, deterministic)
    if policy is not None:
      apply = nn.remat(apply, policy=policy)
    return apply(block, x, None if rates is None else rates[segment.start])

  def body(module, x, rate):
    return module(x, rate, grid, deterministic), None

  if policy is not None:
    body = nn.remat(body, policy=policy, prevent_cse=False)  # CSE cannot cross a scan step
  scan = nn.scan(
      body, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
      length=segment.stop - segment.start, unroll=unroll,
      metadata_params={nn.PARTITION_NAME: 'layers'})
  segment_rates = None if rates is None else jnp.asarray(rates[segment.start:segment.stop])
  return scan(block, x, segment_rates)[0]


class VisionTransformer(nn.Module):
  """mmseg 0.24 ViT without final norm and without cls token in the output.

  `img_size` fixes the stored position grid (img_size // patch_size); other input sizes get the
  grid resized with PyTorch's bicubic kernel on every call, as mmseg does at run time.
  `shrink_index` >= 0 makes that block a QD block (SegViT-Shrunk). `remat`: a key of
  REMAT_POLICIES. `attention`: a `models.attention` implementation. `scan_unroll`: blocks per
  iteration of each segment's scan.
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
    for segment in block_segments(self.depth, self.out_indices, self.shrink_index):
      block = Block(self.num_heads, self.mlp_ratio, shrink=segment.shrink,
                    attention=self.attention, dtype=self.dtype, name=segment.name)
      x = _run_segment(block, segment, x, rates, grid, not train, self.remat, self.scan_unroll)
      grid = next_grid(grid, segment.shrink)
      last = segment.stop - 1
      if last in self.out_indices:
        tap = layers.tokens_to_map(x, grid)
        self.sow('intermediates', f'tap_{last}', tap)
        outputs.append(tap)
    return tuple(outputs)


# ---------------------------------------------------------------------------------------------
# The per-block layout of the official checkpoints and the converter's key tables.


def segments_of(model_config: ml_collections.ConfigDict) -> Tuple[Segment, ...]:
  shrink = model_config.shrink_index if model_config.name == 'segvit_shrunk' else -1
  return block_segments(model_config.depth, tuple(model_config.out_indices), shrink)


def _stack(leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = getattr(first, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = sharding.update(spec=jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _unstack(stacked, n: int):
  if isinstance(stacked, jax.ShapeDtypeStruct):
    sharding = getattr(stacked, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = sharding.update(spec=jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return [jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=sharding)] * n
  return [stacked[i] for i in range(n)]


def stack_blocks(backbone: Mapping[str, Any],
                 model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Per-block backbone params ('block_{i}' subtrees) -> the model's stacked segments.

  Leaves may be numpy or jax arrays or `jax.ShapeDtypeStruct`s (a NamedSharding gains a
  replicated leading dimension); other entries (patch_embed, pos_embed, cls_token) pass through.
  """
  out = dict(backbone)
  for segment in segments_of(model_config):
    if segment.shrink:
      continue
    blocks = [out.pop(f'block_{i}') for i in range(segment.start, segment.stop)]
    out[segment.name] = jax.tree.map(lambda *leaves: _stack(leaves), *blocks)
  return out


def unstack_blocks(backbone: Mapping[str, Any],
                   model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The inverse of `stack_blocks`: one 'block_{i}' subtree per block."""
  out = dict(backbone)
  for segment in segments_of(model_config):
    if segment.shrink:
      continue
    n = segment.stop - segment.start
    per_leaf = jax.tree.map(lambda x: _unstack(x, n), out.pop(segment.name))
    for j in range(n):
      out[f'block_{segment.start + j}'] = jax.tree.map(
          lambda leaves: leaves[j], per_leaf, is_leaf=lambda x: isinstance(x, list))
  return out


def has_per_block_layout(backbone: Mapping[str, Any],
                         model_config: ml_collections.ConfigDict) -> bool:
  """Whether a backbone tree (params, or a checkpoint's metadata tree with the same keys) holds
  one 'block_{i}' per block, as checkpoints written before the blocks were scanned do."""
  scanned = {f'block_{i}' for s in segments_of(model_config) if not s.shrink
             for i in range(s.start, s.stop)}
  return any(isinstance(k, str) and re.fullmatch(r'block_\d+', k) and k in scanned
             for k in backbone)


def _map_backbones(fn, tree):
  """Applies fn to every {'backbone': ...} mapping's backbone in a pytree (params, optimizer
  moments, a whole train state)."""
  def visit(node):
    if isinstance(node, Mapping) and 'backbone' in node:
      return {**node, 'backbone': fn(node['backbone'])}
    return node
  return jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, Mapping) and 'backbone' in x)


def stack_blocks_in(tree, model_config: ml_collections.ConfigDict):
  """`stack_blocks` on every backbone in `tree` (e.g. a train state restored per block)."""
  return _map_backbones(lambda b: stack_blocks(b, model_config), tree)


def unstack_blocks_in(tree, model_config: ml_collections.ConfigDict):
  """`unstack_blocks` on every backbone in `tree` (e.g. the abstract target of a restore)."""
  return _map_backbones(lambda b: unstack_blocks(b, model_config), tree)
