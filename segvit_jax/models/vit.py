"""Plain ViT backbone as mmseg 0.24's `VisionTransformer` builds it (reference section 2), with the
optional query-based down-sampling (QD) block of SegViT-Shrunk (reference 4.1).

Input images are NHWC, normalised. The backbone returns the token maps tapped after the blocks in
`out_indices`, each (B, h, w, D) with its own (h, w): 1/16 of the input, 1/32 after a QD block.
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
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


class Block(nn.Module):
  """Pre-norm transformer block. Drop-path on the FFN branch only, as in mmseg 0.24.

  With `shrink`, the block performs QD: the stride-2 sub-sampled tokens (even rows and columns)
  query the full token map through the block's own attention, LN1 applied to both sides.
  Call: `(tokens (B, h*w, D), grid (h, w), deterministic)` -> tokens on `next_grid(grid)`.
  """
  num_heads: int
  mlp_ratio: int
  drop_path: float
  shrink: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, grid: Tuple[int, int], deterministic: bool):
    ln1 = layers.layer_norm('ln1', VIT_LN_EPS)
    attention = layers.Attention(self.num_heads, dtype=self.dtype, name='attn')
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
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    return x

  def next_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
    # Returned outside the (possibly rematerialised) call so that it stays a static Python tuple.
    return ((grid[0] + 1) // 2, (grid[1] + 1) // 2) if self.shrink else tuple(grid)


class VisionTransformer(nn.Module):
  """mmseg 0.24 ViT without final norm and without cls token in the output.

  `img_size` fixes the stored position grid (img_size // patch_size); other input sizes get the
  grid resized with PyTorch's bicubic kernel on every call, as mmseg does at run time.
  `shrink_index` >= 0 makes that block a QD block (SegViT-Shrunk).
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
  remat: bool = False
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

    block_cls = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
    drop_path = np.linspace(0.0, self.drop_path_rate, self.depth)
    outputs = []
    for i in range(self.depth):
      block = block_cls(
          self.num_heads, self.mlp_ratio, float(drop_path[i]), shrink=(i == self.shrink_index),
          dtype=self.dtype, name=f'block_{i}')
      x = block(x, grid, not train)
      grid = Block.next_grid(block, grid)
      if i in self.out_indices:
        tap = layers.tokens_to_map(x, grid)
        self.sow('intermediates', f'tap_{i}', tap)
        outputs.append(tap)
    return tuple(outputs)
