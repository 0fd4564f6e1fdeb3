"""The FLOP model of SegViT: the paper's count, and the hardware FLOPs of a step from it.

- `model_flops` / `total_flops`: an analytic count of the official PyTorch model as fvcore's
  `FlopCountAnalysis` sees it (the paper's GFLOPs come from the official
  `tools/get_flops_fvcore.py`), one function per official module; `segvit-summary` prints it.
  fvcore's conventions: linear, matmul, bmm, einsum and convolution count one FLOP per
  multiply-add; LayerNorm with affine parameters 5 per input element; bilinear upsampling 4 per
  OUTPUT element, also when input and output sizes are equal (`F.interpolate` is traced either
  way); softmax, GELU, ReLU, sigmoid, additions, scaling and the bicubic position-embedding resize
  (no fvcore handler for `upsample_bicubic2d`) are not counted. Every count is split into three
  kinds: 'matmul', 'norm' and 'upsample'.
- `forward_flops`, `eval_forwards`, `model_flops_per_chip`: hardware FLOPs (2 per multiply-add)
  of a forward pass, the model calls of an eval step, and the model FLOPs per chip of a train and
  an eval step, for MFU and the roofline (`segvit-compile`, bench/throughput.py).
- `jaxpr_macs`: the dot/conv multiply-adds of a jaxpr, which ties the 'matmul' count to our
  model's eval forward pass (tests/test_summary.py).
"""

import collections
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax.extend.core as jcore
import ml_collections

from segvit_jax.evaluation import inference

Counts = collections.Counter  # kind ('matmul', 'norm', 'upsample') -> FLOPs
KINDS = ('matmul', 'norm', 'upsample')
LN_FLOPS_PER_ELEMENT = 5  # fvcore: mean, variance, normalise, scale, shift
BILINEAR_FLOPS_PER_OUTPUT = 4


# ---------------------------------------------------------------------------------------------
# Analytic count, one function per official module. n = tokens (batch folded in), d = width.


def linear(n: int, d_in: int, d_out: int) -> Counts:
  return Counts(matmul=n * d_in * d_out)


def layer_norm(n: int, d: int) -> Counts:
  return Counts(norm=LN_FLOPS_PER_ELEMENT * n * d)


def bilinear_upsample(num_outputs: int) -> Counts:
  return Counts(upsample=BILINEAR_FLOPS_PER_OUTPUT * num_outputs)


def attention(batch: int, nq: int, nk: int, d: int) -> Counts:
  """Multi-head attention of nq queries over nk keys, width d (any number of heads).

  q, k, v and output projections plus the two products q k^T and softmax(.) v; summed over
  heads those cost nq * nk * d each. Holds for torch's `nn.MultiheadAttention` and for the ATM
  `Attention` (separate q/k/v Linear, per-head `q @ k^T`; the head-averaged mask is a sum).
  """
  return (linear(batch * nq, d, d) + linear(batch * nk, d, 2 * d) + linear(batch * nq, d, d)
          + Counts(matmul=2 * batch * nq * nk * d))


def mlp(n: int, d: int, hidden: int) -> Counts:
  return linear(n, d, hidden) + linear(n, hidden, d)


def patch_embed(batch: int, grid: Tuple[int, int], dim: int, patch: int) -> Counts:
  """Conv2d(3, D, patch, stride patch): one multiply-add per output element and kernel tap."""
  return Counts(matmul=batch * grid[0] * grid[1] * dim * 3 * patch * patch)


def vit_block(batch: int, n: int, dim: int, mlp_ratio: int) -> Counts:
  """Pre-norm ViT block: LN1, self-attention, LN2, FFN."""
  return (layer_norm(batch * n, dim) + attention(batch, n, n, dim)
          + layer_norm(batch * n, dim) + mlp(batch * n, dim, mlp_ratio * dim))


def qd_block(batch: int, n: int, n_down: int, dim: int, mlp_ratio: int) -> Counts:
  """QD block of SegViT-Shrunk: the n_down sub-sampled tokens attend to all n tokens.

  The official `ShrinkLayer` calls LN1 on the queries and separately on the key and on the value
  (the same tensor twice), so fvcore sees three LayerNorms before the attention.
  """
  return (layer_norm(batch * n_down, dim) + layer_norm(2 * batch * n, dim)
          + attention(batch, n_down, n, dim)
          + layer_norm(batch * n_down, dim) + mlp(batch * n_down, dim, mlp_ratio * dim))


def decoder_layer(batch: int, nq: int, nk: int, d: int, ffn_ratio: int = 4) -> Counts:
  """Post-norm torch `TransformerDecoderLayer`: self-attn, norm1, cross-attn, norm2, FFN, norm3.

  Used by QU (standard cross-attention) and, via `atm_layer`, by ATM (custom cross-attention with
  the same multiply-add count).
  """
  return (attention(batch, nq, nq, d) + layer_norm(batch * nq, d)
          + attention(batch, nq, nk, d) + layer_norm(batch * nq, d)
          + mlp(batch * nq, d, ffn_ratio * d) + layer_norm(batch * nq, d))


def atm_layer(batch: int, num_classes: int, n_memory: int, d: int) -> Counts:
  """`TPN_DecoderLayer`: K class queries over n_memory tokens; the mask is a by-product."""
  return decoder_layer(batch, num_classes, n_memory, d)


def class_embed(batch: int, num_predictions: int, num_classes: int, d: int) -> Counts:
  """`class_embed` Linear(d, K+1), applied to the stacked queries of every prediction."""
  return linear(batch * num_predictions * num_classes, d, num_classes + 1)


def semantic_inference(batch: int, num_classes: int, size: Tuple[int, int]) -> Counts:
  """einsum('bqc,bqhw->bchw'): K queries x K classes per pixel of `size`. Softmax/sigmoid free."""
  return Counts(matmul=batch * num_classes * num_classes * size[0] * size[1])


def _grid(c: ml_collections.ConfigDict, image_hw: Tuple[int, int]) -> Tuple[int, int]:
  p = c.patch_size
  return -(-image_hw[0] // p), -(-image_hw[1] // p)  # adaptive 'corner' padding rounds up


def _after_qd(grid: Tuple[int, int]) -> Tuple[int, int]:
  return -(-grid[0] // 2), -(-grid[1] // 2)  # x[:, :, ::2, ::2]


def backbone_flops(c: ml_collections.ConfigDict, image_hw: Tuple[int, int],
                   batch: int = 1) -> Dict[str, Counts]:
  """mmseg ViT: {'patch_embed', 'blocks'} and, for 'segvit_shrunk', 'qd_block'."""
  grid = _grid(c, image_hw)
  shrink_index = c.shrink_index if c.name == 'segvit_shrunk' else -1
  out = {'patch_embed': patch_embed(batch, grid, c.embed_dim, c.patch_size), 'blocks': Counts()}
  if shrink_index >= 0:
    out['qd_block'] = Counts()
  for i in range(c.depth):
    n = grid[0] * grid[1]
    if i == shrink_index:
      grid = _after_qd(grid)
      out['qd_block'] += qd_block(batch, n, grid[0] * grid[1], c.embed_dim, c.mlp_ratio)
    else:
      out['blocks'] += vit_block(batch, n, c.embed_dim, c.mlp_ratio)
  return out


def _tap_tokens(c: ml_collections.ConfigDict, image_hw: Tuple[int, int]) -> list:
  """Token count of each backbone tap in `out_indices` order."""
  grid = _grid(c, image_hw)
  shrink_index = c.shrink_index if c.name == 'segvit_shrunk' else -1
  tokens = []
  for i in range(c.depth):
    if i == shrink_index:
      grid = _after_qd(grid)
    if i in c.out_indices:
      tokens.append(grid[0] * grid[1])
  return tokens


def _inference(c: ml_collections.ConfigDict, image_hw, batch, num_masks: int,
               mask_tokens: int) -> Dict[str, Counts]:
  """Mask interpolations, `semantic_inference` at img_size, and the resize to the input."""
  k = c.num_classes
  img = tuple(c.img_size)
  return {
      # Every mask is interpolated to the last map size first (identity, still traced).
      'mask_upsample': bilinear_upsample(num_masks * batch * k * mask_tokens)
                       + bilinear_upsample(batch * k * img[0] * img[1]),
      'semantic_inference': semantic_inference(batch, k, img),
      # mmseg EncoderDecoder.encode_decode: resize to the input size (traced even if equal).
      'resize_to_input': bilinear_upsample(batch * k * image_hw[0] * image_hw[1]),
  }


def atm_head_flops(c: ml_collections.ConfigDict, image_hw: Tuple[int, int],
                   batch: int = 1) -> Dict[str, Counts]:
  """`ATMHead`: per stage input_proj + proj_norm + an ATM decoder; class_embed; inference."""
  k, d = c.num_classes, c.decoder_dim
  taps = _tap_tokens(c, image_hw)[-c.use_stages:][::-1]
  out = {'input_proj': Counts(), 'atm_decoders': Counts()}
  for n in taps:
    out['input_proj'] += linear(batch * n, c.embed_dim, d) + layer_norm(batch * n, d)
    for _ in range(c.decoder_layers):
      out['atm_decoders'] += atm_layer(batch, k, n, d)
  out['class_embed'] = class_embed(batch, len(taps), k, d)
  out.update(_inference(c, image_hw, batch, len(taps), taps[-1]))
  return out


def shrunk_head_flops(c: ml_collections.ConfigDict, image_hw: Tuple[int, int],
                      batch: int = 1) -> Dict[str, Counts]:
  """`TPNATMHead`: QU (learned grid queries, two standard decoders) + `ATMSingleHead`."""
  k, d = c.num_classes, c.decoder_dim
  taps = _tap_tokens(c, image_hw)[-c.use_stages:]  # not reversed
  query_grid = _grid(c, tuple(c.img_size))  # fixed by img_size, whatever the input
  nq = query_grid[0] * query_grid[1]
  out = {'input_proj': Counts(), 'qu_decoders': Counts(), 'atm_decoders': Counts()}
  for n in taps:
    out['input_proj'] += linear(batch * n, c.embed_dim, d) + layer_norm(batch * n, d)
    for _ in range(c.decoder_layers):
      out['qu_decoders'] += decoder_layer(batch, nq, n, d)
  for _ in range(c.decoder_layers):  # ATMSingleHead: input_proj/proj_norm are Identity
    out['atm_decoders'] += atm_layer(batch, k, nq, d)
  out['class_embed'] = class_embed(batch, c.decoder_layers, k, d)
  out.update(_inference(c, image_hw, batch, c.decoder_layers, nq))
  return out


def model_flops(c: ml_collections.ConfigDict, image_hw: Optional[Sequence[int]] = None,
                batch: int = 1) -> Dict[str, Counts]:
  """Analytic FLOPs of the eval forward pass, per module ('backbone/...', 'head/...').

  Args:
    c: `config.model`.
    image_hw: input (H, W); default `c.img_size` (what the paper reports).
    batch: batch size.

  Returns:
    {module name: Counts(matmul=..., norm=..., upsample=...)}.
  """
  image_hw = tuple(c.img_size) if image_hw is None else tuple(image_hw)
  head = shrunk_head_flops if c.name == 'segvit_shrunk' else atm_head_flops
  out = {f'backbone/{k}': v for k, v in backbone_flops(c, image_hw, batch).items()}
  out.update({f'head/{k}': v for k, v in head(c, image_hw, batch).items()})
  return out


def total_flops(breakdown: Mapping[str, Counts], kinds: Sequence[str] = KINDS) -> int:
  return sum(counts[kind] for counts in breakdown.values() for kind in kinds)


# ---------------------------------------------------------------------------------------------
# Hardware FLOPs of a run's steps (MFU, the roofline).


def forward_flops(model_config: ml_collections.ConfigDict, image_hw, *, train: bool) -> float:
  """Hardware FLOPs of one forward pass (batch 1) from the analytic count above.

  That count takes a multiply-add as one FLOP (fvcore's convention): matmuls count twice here.
  The train forward stops at the mask logits: no semantic inference nor resizes to the input.
  """
  breakdown = model_flops(model_config, tuple(image_hw))
  if train:
    breakdown = {k: v for k, v in breakdown.items()
                 if k not in ('head/mask_upsample', 'head/semantic_inference',
                              'head/resize_to_input')}
  return (2 * total_flops(breakdown, ('matmul',))
          + total_flops(breakdown, ('norm', 'upsample')))


def eval_forwards(config: ml_collections.ConfigDict) -> list:
  """[(input (h, w), count)] of the model calls per image of one eval step, every window active.

  The compiled step runs at most this many (windows outside an image's grid are skipped).
  """
  e, d = config.eval, config.dataset
  bucket = tuple(int(s) for s in d.eval_pad_size)
  crop = tuple(int(s) for s in e.crop_size)
  spec = inference.InferenceSpec.from_config(config)
  ratios, flips = spec.ratios, spec.flips
  out = []
  for ratio in ratios:
    size = bucket if ratio == 1.0 else spec.scaled_bucket(bucket, ratio)
    if e.mode == 'whole':
      out.append((size, len(flips)))
    else:
      grid = [inference.window_count(max(s, c), c, int(st))
              for s, c, st in zip(size, crop, e.stride)]
      out.append((crop, len(flips) * grid[0] * grid[1]))
  return out


def model_flops_per_chip(config: ml_collections.ConfigDict, chips: int, *, train_batch: int,
                         eval_batch: int) -> tuple:
  """(train, eval) model FLOPs per chip per step: 3 x forward for train, every eval view."""
  m = config.model
  train = 3 * forward_flops(m, config.dataset.crop_size, train=True) * train_batch / chips
  per_image = sum(n * forward_flops(m, hw, train=False) for hw, n in eval_forwards(config))
  return train, per_image * eval_batch / chips


# ---------------------------------------------------------------------------------------------
# Multiply-adds measured on a jaxpr (used by the tests to tie the formula to the model).


def _dot_general_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
  rhs_free = [s for i, s in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return math.prod(lhs) * math.prod(rhs_free)


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
  # Each output element takes (C_in / groups) * kh * kw multiply-adds.
  return math.prod(out) * math.prod(rhs) // out_features


def _sub_jaxprs(eqn):
  """The jaxprs nested in an equation's parameters (pjit, remat, custom_jvp/vjp, scan, cond)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def jaxpr_macs(jaxpr, constant_inputs: Sequence[bool] = (),
               skip_constant_operands: bool = True) -> int:
  """Multiply-adds of every dot_general and conv_general_dilated in `jaxpr`, sub-jaxprs included.

  Args:
    jaxpr: a `ClosedJaxpr` (from `jax.make_jaxpr`) or `Jaxpr`.
    constant_inputs: per input variable, whether it is a trace-time constant.
    skip_constant_operands: leave out products with an operand computed from constants only.
      `segvit_jax.models.resize` resizes by multiplying with numpy interpolation matrices,
      which appear as constants; fvcore counts interpolations per output element instead (see
      'upsample').

  Returns:
    The multiply-add count. Scans count `length` times; `while` loops are refused.
  """
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  constant = set(jaxpr.constvars)
  for var, is_const in zip(jaxpr.invars, constant_inputs):
    if is_const:
      constant.add(var)

  def is_const(v):
    return isinstance(v, jcore.Literal) or v in constant

  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    in_const = [is_const(v) for v in eqn.invars]
    if name == 'while':
      raise ValueError('jaxpr_macs cannot count a while loop (unknown trip count).')
    if name in ('dot_general', 'conv_general_dilated'):
      if not (skip_constant_operands and any(in_const)):
        total += _dot_general_macs(eqn) if name == 'dot_general' else _conv_macs(eqn)
    subs = list(_sub_jaxprs(eqn))
    if subs:
      trips = eqn.params.get('length', 1) if name == 'scan' else 1
      sub_totals = []
      for sub in subs:
        # cond's branches take the operands after the predicate; others take all inputs.
        flags_in = in_const[len(in_const) - len(sub.invars):] if sub.invars else []
        sub_totals.append(jaxpr_macs(sub, flags_in, skip_constant_operands))
      total += trips * (max(sub_totals) if name == 'cond' else sum(sub_totals))
    if in_const and all(in_const):
      constant.update(eqn.outvars)
  return total
