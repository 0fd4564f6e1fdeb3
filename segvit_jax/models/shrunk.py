"""The QU head of SegViT-Shrunk (official `TPNATMHead`, `decode_heads/tpn_atm_head.py`).

Learned queries, one per cell of the stored 1/16 grid (`img_size // 16`), read the 1/16 backbone
tap and then the 1/32 tap through two standard decoders (NOT reversed: shallow first). The queries
form a (B, gh, gw, d) map on which a single-stage ATM head predicts. As in the official code, the
query grid is fixed by `img_size`: other input sizes still give masks on that grid, which the
model then resizes to the input.
"""

from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from segvit_jax.models import atm
from segvit_jax.models import layers

Dtype = Any


class QUHead(nn.Module):
  """Query-based up-sampling + `ATMSingleHead`. Returns the ATM predictions (see `atm`)."""
  num_classes: int
  query_grid: Tuple[int, int]
  dim: int
  num_heads: int
  num_layers: int = 3
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  attention: str = 'xla'

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], *, train: bool) -> List[Tuple]:
    batch = features[0].shape[0]
    gh, gw = self.query_grid
    table = self.param('queries',
                       layers.partitioned(nn.initializers.normal(1.0), ('queries', 'embed')),
                       (gh * gw, self.dim))
    queries = jnp.broadcast_to(table.astype(self.dtype), (batch, gh * gw, self.dim))
    for s, feature in enumerate(features, start=1):
      tokens, _ = layers.map_to_tokens(feature)
      lateral = layers.dense(self.dim, f'input_proj_{s}', self.dtype, 'embed', 'mlp')(tokens)
      lateral = layers.layer_norm(f'proj_norm_{s}', atm.HEAD_LN_EPS)(lateral).astype(self.dtype)
      outputs, _ = atm.Decoder(self.num_layers, self.num_heads, self.dropout_rate, self.dtype,
                               standard_cross_attn=True, attention=self.attention,
                               name=f'decoder_{s}')(queries, lateral, not train)
      queries = outputs[-1]
    feature_map = layers.tokens_to_map(queries, (gh, gw))
    return atm.ATMSingleHead(self.num_classes, self.num_heads, self.num_layers, self.dropout_rate,
                             self.dtype, attention=self.attention, name='atm')(
                                 feature_map, train=train)
