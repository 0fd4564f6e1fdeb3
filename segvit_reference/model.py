"""A PyTorch reference of the official SegViT modules and loss, for parity tests and benchmarks.

Written from the official code: mmseg 0.24's `VisionTransformer` (mmseg/models/backbones/vit.py)
and the SegViT repository's `vit_shrink` (backbone/vit_shrink.py), `ATMHead`
(decode_heads/atm_head.py), `TPNATMHead` / `ATMSingleHead` (decode_heads/tpn_atm_head.py,
atm_single_head.py) and `ATMLoss` (losses/atm_loss.py, criterion.py). Module names are chosen so
that `state_dict()` keys and shapes are exactly those of the released checkpoints (`backbone.*`,
`decode_head.*`, including the `loss_decode.criterion.empty_weight` buffers). The code imports
nothing from `segvit_jax`.

Layouts follow PyTorch: images NCHW, token tensors (B, N, D), decoder sequences (L, B, C).

One deliberate generalisation: the official code reshapes token sequences to square grids
(`d3_to_d4`: h = w = sqrt(N), dropping a first token when N is odd). Here every reshape is given the
real (h, w) of its grid, which agrees with the official code on square grids and also runs on
non-square inputs (the official code crashes there).
"""

from typing import Dict, Tuple

import torch
from torch import nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Backbone: mmseg 0.24 VisionTransformer (+ vit_shrink).


class DropPath(nn.Module):
  """Stochastic depth on the residual branch (per sample)."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class PatchEmbed(nn.Module):
  """Conv patchify; pads bottom/right to a multiple of the patch ('corner' adaptive padding)."""

  def __init__(self, dim: int, patch: int = 16, in_channels: int = 3):
    super().__init__()
    self.patch = patch
    self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % self.patch, (-w) % self.patch
    if pad_h or pad_w:
      x = F.pad(x, (0, pad_w, 0, pad_h))
    x = self.projection(x)
    grid = tuple(x.shape[-2:])
    return x.flatten(2).transpose(1, 2), grid


class MMCVMultiheadAttention(nn.Module):
  """mmcv's MultiheadAttention wrapper: torch MHA on batch-first tensors, residual added inside."""

  def __init__(self, dim: int, heads: int, attn_drop: float = 0.0):
    super().__init__()
    self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_drop, bias=True)

  def forward(self, query, key=None, value=None, identity=None):
    key = query if key is None else key
    value = key if value is None else value
    identity = query if identity is None else identity
    out = self.attn(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                    need_weights=False)[0]
    return identity + out.transpose(0, 1)


class FFN(nn.Module):
  """mmcv FFN with num_fcs=2: Linear -> GELU (exact) -> Linear, residual with DropPath inside."""

  def __init__(self, dim: int, hidden: int, drop_path: float = 0.0):
    super().__init__()
    self.layers = nn.Sequential(
        nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
        nn.Linear(hidden, dim), nn.Dropout(0.0))
    self.drop_path = DropPath(drop_path)

  def forward(self, x, identity):
    return identity + self.drop_path(self.layers(x))


class EncoderLayer(nn.Module):
  """mmseg 0.24 TransformerEncoderLayer (pre-norm, LN eps 1e-6, no DropPath on attention)."""

  def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, drop_path: float = 0.0):
    super().__init__()
    self.ln1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = MMCVMultiheadAttention(dim, heads)
    self.ln2 = nn.LayerNorm(dim, eps=1e-6)
    self.ffn = FFN(dim, mlp_ratio * dim, drop_path)

  def forward(self, x, kv=None):
    if kv is None:
      x = self.attn(self.ln1(x), identity=x)
    else:  # vit_shrink QD: queries are the sub-sampled tokens, keys/values all tokens.
      kv = self.ln1(kv)
      x = self.attn(self.ln1(x), key=kv, value=kv, identity=x)
    return self.ffn(self.ln2(x), identity=x)


def resize_pos_embed(pos_embed, grid: Tuple[int, int], pos_grid: Tuple[int, int]):
  """Bicubic (align_corners=False) resize of the patch part of (1, 1 + gh*gw, D); cls slot kept."""
  cls_slot = pos_embed[:, :1]
  gh, gw = pos_grid
  table = pos_embed[:, -gh * gw:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
  table = F.interpolate(table, size=grid, mode='bicubic', align_corners=False)
  return torch.cat([cls_slot, table.flatten(2).transpose(1, 2)], dim=1)


class VisionTransformer(nn.Module):
  """mmseg VisionTransformer with with_cls_token=False, final_norm=False (shrink_idx: vit_shrink).

  forward(images (B, 3, H, W)) -> (taps, grids): taps as the official code returns them, i.e.
  (B, D, h, w) maps for the plain ViT and (B, N, D) tokens for vit_shrink; grids the (h, w) of each.
  """

  def __init__(self, img_size=(64, 64), patch_size=16, embed_dims=64, num_layers=4, num_heads=4,
               mlp_ratio=4, out_indices=(1, 2, 3), drop_path_rate=0.0, shrink_idx=None):
    super().__init__()
    self.img_size = tuple(img_size)
    self.patch_size = patch_size
    self.out_indices = tuple(out_indices)
    self.shrink_idx = shrink_idx
    self.patch_embed = PatchEmbed(embed_dims, patch_size)
    num_patches = (img_size[0] // patch_size) * (img_size[1] // patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dims))
    rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]  # linspace
    self.layers = nn.ModuleList(
        [EncoderLayer(embed_dims, num_heads, mlp_ratio, rates[i]) for i in range(num_layers)])

  def forward(self, images):
    b = images.shape[0]
    x, grid = self.patch_embed(images)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    pos = self.pos_embed
    if x.shape[1] != pos.shape[1]:
      pos_grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
      pos = resize_pos_embed(pos, grid, pos_grid)
    x = (x + pos)[:, 1:]  # with_cls_token=False: the cls slot is dropped before the blocks
    taps, grids = [], []
    for i, layer in enumerate(self.layers):
      if i == self.shrink_idx:
        h, w = grid
        maps = x.transpose(1, 2).reshape(b, -1, h, w)
        down = maps[:, :, ::2, ::2]
        grid = tuple(down.shape[-2:])
        x = layer(down.flatten(2).transpose(1, 2), kv=x)
      else:
        x = layer(x)
      if i in self.out_indices:
        if self.shrink_idx is None:
          taps.append(x.transpose(1, 2).reshape(b, -1, *grid))
        else:
          taps.append(x)
        grids.append(grid)
    return tuple(taps), tuple(grids)


# ------------------------------------------------------------------------------------------------
# ATM decoder.


class Attention(nn.Module):
  """SegViT's cross-attention: separate q/k/v/proj; also returns the head-averaged pre-softmax
  logits (the ATM mask)."""

  def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q = nn.Linear(dim, dim)
    self.k = nn.Linear(dim, dim)
    self.v = nn.Linear(dim, dim)
    self.attn_drop = nn.Dropout(attn_drop)
    self.proj = nn.Linear(dim, dim)

  def forward(self, xq, xk, xv):
    """xq (B, Nq, C), xk/xv (B, Nk, C) -> out (Nq, B, C), logits (B, Nq, Nk)."""
    b, nq, c = xq.shape
    split = lambda t: t.reshape(b, t.shape[1], self.num_heads, c // self.num_heads).transpose(1, 2)
    q, k, v = split(self.q(xq)), split(self.k(xk)), split(self.v(xv))
    logits = (q @ k.transpose(-2, -1)) * self.scale
    attn = self.attn_drop(logits.softmax(dim=-1))
    out = self.proj((attn @ v).transpose(1, 2).reshape(b, nq, c))
    return out.transpose(0, 1), logits.sum(dim=1) / self.num_heads


class TPNDecoderLayer(nn.TransformerDecoderLayer):
  """Post-norm decoder layer whose cross-attention is `Attention` (registered last, as official)."""

  def __init__(self, d_model: int, nhead: int, dropout: float = 0.1):
    super().__init__(d_model=d_model, nhead=nhead, dim_feedforward=4 * d_model, dropout=dropout)
    del self.multihead_attn
    self.multihead_attn = Attention(d_model, nhead, attn_drop=dropout)

  def forward(self, tgt, memory):
    """tgt (Nq, B, C), memory (Nk, B, C) -> (tgt, mask logits (B, Nq, Nk))."""
    tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, tgt, tgt, need_weights=False)[0]))
    out, logits = self.multihead_attn(tgt.transpose(0, 1), memory.transpose(0, 1),
                                      memory.transpose(0, 1))
    tgt = self.norm2(tgt + self.dropout2(out))
    tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
    return tgt, logits


class TPNDecoder(nn.TransformerDecoder):
  """Chains TPN layers; returns every layer's (output, mask logits)."""

  def forward(self, tgt, memory):
    outputs, logits = [], []
    for layer in self.layers:
      tgt, attn = layer(tgt, memory)
      outputs.append(tgt)
      logits.append(attn)
    return outputs, logits


class SetCriterionBuffers(nn.Module):
  """Holds the `empty_weight` buffer of the official SetCriterion (ones, last = eos_coef)."""

  def __init__(self, num_classes: int, eos_coef: float = 0.1):
    super().__init__()
    weight = torch.ones(num_classes + 1)
    weight[-1] = eos_coef
    self.register_buffer('empty_weight', weight)


class ATMLossModule(nn.Module):
  """`loss_decode` of the heads: only its state (the loss itself is `atm_loss` below)."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.criterion = SetCriterionBuffers(num_classes)


def tokens_to_maps(t, grid):
  """(B, h*w, C) -> (B, C, h, w), with the real grid instead of the official square guess."""
  return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def semantic_inference(class_logits, mask_logits):
  """(B, Q, K+1), (B, Q, H, W) -> (B, K, H, W) non-negative scores."""
  cls = F.softmax(class_logits, dim=-1)[..., :-1]
  return torch.einsum('bqc,bqhw->bchw', cls, mask_logits.sigmoid())


def _head_outputs(img_size, class_embed, queries, masks):
  """The dict both ATM heads build from per-step queries (Q, B, d) and (B, K, h, w) masks."""
  class_logits = class_embed(torch.stack([q.transpose(0, 1) for q in queries], dim=0))
  pred_masks = F.interpolate(masks[-1], size=(img_size, img_size), mode='bilinear',
                             align_corners=False)
  out = {'pred_logits': class_logits[-1], 'pred_masks': pred_masks,
         'pred': semantic_inference(class_logits[-1], pred_masks),
         'aux_outputs': [{'pred_logits': c, 'pred_masks': m}
                         for c, m in zip(class_logits[:-1], masks[:-1])],
         'masks': list(masks)}
  return out


class ATMHead(nn.Module):
  """The plain-model head: 3 stages (deepest first), cumulative masks, one query per class.

  forward(taps, grids) returns a dict: 'pred' (B, K, img, img) scores, 'pred_logits' (B, K, K+1),
  'pred_masks' (B, K, img, img), 'aux_outputs' [{'pred_logits', 'pred_masks' (B, K, h, w)}] x 2,
  plus for tests 'stage_logits' [(B, K, h, w)] the raw A_s per stage (in the official
  reversed order) and 'masks' the cumulative masks.
  """

  def __init__(self, img_size=64, in_channels=64, embed_dims=32, num_layers=3, num_heads=4,
               use_stages=3, num_classes=7, dropout=0.1):
    super().__init__()
    self.img_size = img_size
    self.use_stages = use_stages
    for i in range(use_stages):
      self.add_module(f'input_proj_{i + 1}', nn.Linear(in_channels, embed_dims))
      self.add_module(f'proj_norm_{i + 1}', nn.LayerNorm(embed_dims))
      self.add_module(f'decoder_{i + 1}', TPNDecoder(
          TPNDecoderLayer(embed_dims, num_heads, dropout), num_layers))
    self.q = nn.Embedding(num_classes, embed_dims)
    self.class_embed = nn.Linear(embed_dims, num_classes + 1)
    self.loss_decode = ATMLossModule(num_classes)

  def forward(self, taps, grids):
    xs = [t.flatten(2).transpose(1, 2) for t in taps[:self.use_stages]][::-1]
    grids = list(grids[:self.use_stages])[::-1]
    q = self.q.weight.unsqueeze(1).repeat(1, xs[0].shape[0], 1)
    queries, stage_logits = [], []
    for i, (x, grid) in enumerate(zip(xs, grids)):
      lateral = getattr(self, f'proj_norm_{i + 1}')(getattr(self, f'input_proj_{i + 1}')(x))
      outs, logits = getattr(self, f'decoder_{i + 1}')(q, lateral.transpose(0, 1))
      q = outs[-1]  # official TPN_Decoder returns the last layer's output and logits only
      queries.append(q)
      stage_logits.append(tokens_to_maps(logits[-1].transpose(1, 2), grid))
    size = stage_logits[-1].shape[-2:]
    masks = []
    for a in stage_logits:
      a = F.interpolate(a, size=size, mode='bilinear', align_corners=False)
      masks.append(a if not masks else masks[-1] + a)
    out = _head_outputs(self.img_size, self.class_embed, queries, masks)
    out['stage_logits'] = stage_logits
    return out


class ATMSingleHead(nn.Module):
  """The shrunk model's ATM: one decoder on a given map; per-layer (non-cumulative) masks."""

  def __init__(self, img_size, embed_dims, num_layers, num_heads, num_classes, dropout=0.1):
    super().__init__()
    self.img_size = img_size
    self.decoder_1 = TPNDecoder(TPNDecoderLayer(embed_dims, num_heads, dropout), num_layers)
    self.q = nn.Embedding(num_classes, embed_dims)
    self.class_embed = nn.Linear(embed_dims, num_classes + 1)
    self.loss_decode = ATMLossModule(num_classes)

  def forward(self, feature_map):
    b, _, h, w = feature_map.shape
    memory = feature_map.flatten(2).permute(2, 0, 1)  # (hw, B, d); input_proj/norm are Identity
    q = self.q.weight.unsqueeze(1).repeat(1, b, 1)
    outs, logits = self.decoder_1(q, memory)
    masks = [tokens_to_maps(a.transpose(1, 2), (h, w)) for a in logits]
    out = _head_outputs(self.img_size, self.class_embed, outs, masks)
    out['stage_logits'] = masks
    return out


class TPNATMHead(nn.Module):
  """Shrunk head: QU with (img/16)^2 learned queries over out7 then out23, then ATMSingleHead."""

  def __init__(self, img_size=64, in_channels=64, embed_dims=32, num_layers=3, num_heads=4,
               use_stages=2, num_classes=7, dropout=0.1):
    super().__init__()
    self.img_size = img_size
    self.use_stages = use_stages
    for i in range(use_stages):
      self.add_module(f'input_proj_{i + 1}', nn.Linear(in_channels, embed_dims))
      self.add_module(f'proj_norm_{i + 1}', nn.LayerNorm(embed_dims))
      layer = nn.TransformerDecoderLayer(embed_dims, num_heads, 4 * embed_dims, dropout=dropout)
      self.add_module(f'decoder_{i + 1}', nn.TransformerDecoder(layer, num_layers))
    self.q = nn.Embedding((img_size // 16) ** 2, embed_dims)
    self.atm = ATMSingleHead(img_size, embed_dims, num_layers, num_heads, num_classes, dropout)
    self.loss_decode = ATMLossModule(num_classes)

  def forward(self, taps, grids):
    del grids  # the tokens are attended to as a set; the QU grid is the config's
    q = self.q.weight.unsqueeze(1).repeat(1, taps[0].shape[0], 1)
    for i, x in enumerate(taps[:self.use_stages]):  # not reversed
      lateral = getattr(self, f'proj_norm_{i + 1}')(getattr(self, f'input_proj_{i + 1}')(x))
      q = getattr(self, f'decoder_{i + 1}')(q, lateral.transpose(0, 1))
    side = self.img_size // 16
    out = self.atm(tokens_to_maps(q.transpose(0, 1), (side, side)))
    out['qu_features'] = q.transpose(0, 1)
    return out


class EncoderDecoder(nn.Module):
  """mmseg EncoderDecoder: `backbone.*` / `decode_head.*` keys; whole-image `encode_decode`."""

  def __init__(self, backbone: nn.Module, decode_head: nn.Module):
    super().__init__()
    self.backbone = backbone
    self.decode_head = decode_head

  def forward_all(self, images):
    """images (B, 3, H, W) -> dict with 'taps', 'grids', the head outputs and 'scores'.

    'scores' (B, K, H, W) is what mmseg's `encode_decode` returns: the head's `pred` at img_size,
    bilinearly resized (align_corners=False) to the input size.
    """
    taps, grids = self.backbone(images)
    out = self.decode_head(taps, grids)
    out['taps'], out['grids'] = taps, grids
    scores = out['pred']
    if tuple(scores.shape[-2:]) != tuple(images.shape[-2:]):
      scores = F.interpolate(scores, size=images.shape[-2:], mode='bilinear', align_corners=False)
    out['scores'] = scores
    return out


# ------------------------------------------------------------------------------------------------
# ATM loss, the official per-image formulation (losses/atm_loss.py + criterion.py).


def _focal(logits, targets, num_masks, alpha=0.25, gamma=2.0):
  prob = logits.sigmoid()
  ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss.mean(1).sum() / num_masks


def _dice(logits, targets, num_masks):
  p = logits.sigmoid().flatten(1)
  num = 2 * (p * targets).sum(-1)
  den = p.sum(-1) + targets.sum(-1)
  return (1 - (num + 1) / (den + 1)).sum() / num_masks


def atm_loss(out, labels, num_classes, eos_coef=0.1, cls_weight=1.0, mask_weight=20.0,
             dice_weight=1.0, ignore_index=255) -> Dict[str, torch.Tensor]:
  """Weighted loss terms as mmseg logs them ('loss_ce', 'loss_mask', 'loss_dice', '..._i').

  out: a head's train dict ('pred_logits', 'pred_masks', 'aux_outputs'); labels (B, H, W) int64.
  Fixed matching query c <-> class c; every present class of every image is one mask.
  """
  present = []
  for lab in labels:
    classes = lab.unique()
    present.append(classes[classes != ignore_index])
  num_masks = max(float(sum(len(c) for c in present)), 1.0)
  weight = torch.ones(num_classes + 1, device=labels.device)
  weight[-1] = eos_coef

  def terms(logits, masks):
    target = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    for b, classes in enumerate(present):
      target[b, classes] = classes
    ce = F.cross_entropy(logits.transpose(1, 2), target, weight)
    src, tgt = [], []
    for b, classes in enumerate(present):
      for c in classes:
        src.append(masks[b, c])
        tgt.append((labels[b] == c).float())
    src = F.interpolate(torch.stack(src)[:, None], size=labels.shape[-2:], mode='bilinear',
                        align_corners=False)[:, 0].flatten(1)
    tgt = torch.stack(tgt).flatten(1)
    return {'loss_ce': cls_weight * ce, 'loss_mask': mask_weight * _focal(src, tgt, num_masks),
            'loss_dice': dice_weight * _dice(src, tgt, num_masks)}

  losses = terms(out['pred_logits'], out['pred_masks'])
  for i, aux in enumerate(out['aux_outputs']):
    losses.update({f'{k}_{i}': v for k, v in terms(aux['pred_logits'], aux['pred_masks']).items()})
  return losses


# ------------------------------------------------------------------------------------------------
# Building small models.


def build(kind='plain', img_size=64, embed_dims=64, num_layers=4, num_heads=4,
          out_indices=(1, 2, 3), decoder_dims=32, decoder_heads=4, decoder_layers=3,
          num_classes=7, shrink_idx=2, mlp_ratio=4, dropout=0.1, drop_path_rate=0.0):
  """A small official-layout model. kind: 'plain' (ViT + ATMHead) or 'shrunk' (vit_shrink + TPN)."""
  shrunk = kind == 'shrunk'
  backbone = VisionTransformer(
      (img_size, img_size), 16, embed_dims, num_layers, num_heads, mlp_ratio, out_indices,
      drop_path_rate, shrink_idx if shrunk else None)
  head_cls = TPNATMHead if shrunk else ATMHead
  head = head_cls(img_size, embed_dims, decoder_dims, decoder_layers, decoder_heads,
                  len(out_indices), num_classes, dropout)
  return EncoderDecoder(backbone, head)
