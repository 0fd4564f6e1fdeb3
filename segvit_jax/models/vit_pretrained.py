"""Pretrained ImageNet ViTs as the backbone init for training (`config.pretrained_backbone`).

    params = vit_pretrained.load(params, 'L_16-i21k-...-res_384.npz', config.model)

Two files work: Google's AugReg `.npz` (flax layouts already, loads with numpy only), and the
mmseg `vit_*_p16_384*.pth` the official configs name (mmseg `tools/model_converters/
vitjax2mmseg.py` made them from those .npz files; reading them needs torch). The stored 24 x 24
position grid is resized to `img_size / patch_size` with PyTorch's bicubic kernel, as mmseg's
`VisionTransformer.init_weights` does; the cls slot is kept as is. QD adds no parameters, so the
plain ViT weights load into the shrunk backbone unchanged. The head keeps its initialisation.
"""

import math
from typing import Any, Dict, Mapping, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax.convert import keymap
from segvit_jax.models import resize
from segvit_jax.convert import torch_files
from segvit_jax.models import vit
from segvit_jax.errors import UserError

_FLAG = 'config.pretrained_backbone'
_POS_KEYS = ('Transformer/posembed_input/pos_embedding', 'pos_embed')

AUGREG_IGNORED = (
    (r'Transformer/encoder_norm/(scale|bias)', 'final encoder norm (final_norm=False)'),
    (r'head/(kernel|bias)', 'ImageNet classifier'),
    (r'pre_logits/(kernel|bias)', 'pre-logits layer'),
)
MMSEG_VIT_IGNORED = (
    (r'ln1\.(weight|bias)', 'final encoder norm (final_norm=False)'),
)


def augreg_rules():
  """Google AugReg ViT .npz (flax layouts already: names change, arrays do not)."""
  block, dst = 'Transformer/encoderblock_{i}/', 'backbone/block_{i}/'
  copy = keymap.COPY
  rules = [('embedding/kernel', 'backbone/patch_embed/kernel', copy),  # HWIO as flax Conv
           ('embedding/bias', 'backbone/patch_embed/bias', copy),
           ('cls', 'backbone/cls_token', copy),
           ('Transformer/posembed_input/pos_embedding', 'backbone/pos_embed', copy)]
  for p in ('kernel', 'bias'):
    for n in ('query', 'key', 'value', 'out'):
      rules.append((f'{block}MultiHeadDotProductAttention_1/{n}/{p}', f'{dst}attn/{n}/{p}', copy))
    rules += [(f'{block}MlpBlock_3/Dense_0/{p}', f'{dst}mlp/fc1/{p}', copy),
              (f'{block}MlpBlock_3/Dense_1/{p}', f'{dst}mlp/fc2/{p}', copy)]
  for p in ('scale', 'bias'):
    rules += [(f'{block}LayerNorm_0/{p}', f'{dst}ln1/{p}', copy),
              (f'{block}LayerNorm_2/{p}', f'{dst}ln2/{p}', copy)]
  return rules


def resize_pos_embed(table: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """(1, 1 + n*n, D) -> (1, 1 + gh*gw, D): cls slot kept, PyTorch-bicubic on the square grid."""
  side = math.isqrt(table.shape[1] - 1)
  if side * side != table.shape[1] - 1:
    raise UserError(f'{_FLAG}: pos_embed {table.shape} does not hold a square grid plus a cls '
                    'slot.')
  if (side, side) == tuple(grid):
    return table
  patches = table[:, 1:].reshape(1, side, side, -1)
  patches = np.asarray(resize.resize_bicubic_torch(jnp.asarray(patches), grid))
  logging.info('Resized the pretrained position grid %dx%d -> %dx%d (bicubic, PyTorch kernel).',
               side, side, *grid)
  return np.concatenate([table[:, :1], patches.reshape(1, grid[0] * grid[1], -1)], axis=1)


def _read(path: str):
  """(state: name -> array-like, rules, ignored) of an AugReg .npz or an mmseg ViT .pth."""
  if path.endswith('.npz'):
    try:
      with np.load(path) as data:
        state = {k: np.asarray(data[k], np.float32) for k in data.files}
    except FileNotFoundError as e:
      raise UserError(f'{_FLAG}={path}: no such file.') from e
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{_FLAG}={path} cannot be read as an .npz file: {e}') from e
    return state, augreg_rules(), AUGREG_IGNORED
  if path.endswith(('.pth', '.pt', '.bin')):
    state, _ = torch_files.read_state_dict(path)
    if any(k.startswith('backbone.') for k in state):  # e.g. a whole mmseg segmentor checkpoint
      state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return state, keymap.vit_rules(prefix=''), MMSEG_VIT_IGNORED
  raise UserError(f'{_FLAG}={path}: expected an AugReg .npz or an mmseg ViT .pth file (by '
                  'extension).')


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _leaf_value(x):
  return x.value if _is_box(x) else x


def _summary(path: str, loaded: Mapping[str, Any], head: Any, ignored) -> str:
  head_leaves = [_leaf_value(x) for x in jax.tree_util.tree_leaves(head, is_leaf=_is_box)]
  lines = [f'Pretrained backbone from {path}:',
           f'  loaded       {len(loaded):4d} tensors  '
           f'{sum(int(v.size) for v in loaded.values()):>12,d} params  (backbone)',
           f'  initialised  {len(head_leaves):4d} tensors  '
           f'{sum(int(np.prod(x.shape)) for x in head_leaves):>12,d} params  (head, fresh)',
           f'  ignored      {len(ignored):4d} tensors'] + [f'    {line}' for line in ignored]
  return '\n'.join(lines)


def load(params: Dict[str, Any], path: str,
         model_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`params` with its backbone replaced by a pretrained ViT; the head keeps its initialisation.

  Args:
    params: the model's params ({'backbone', 'head'}), arrays or boxed `nn.Partitioned`, possibly
      sharded: replaced leaves keep each original leaf's box and sharding.
    path: an AugReg `.npz` (e.g. 'L_16-i21k-...-res_384.npz') or an mmseg `vit_*_p16_384*.pth`.
    model_config: config.model (img_size and patch_size give the position grid).

  Logs a table of loaded / initialised / ignored tensors.
  """
  state, rules, ignored = _read(path)
  grid = (model_config.img_size[0] // model_config.patch_size,
          model_config.img_size[1] // model_config.patch_size)
  state = {k: resize_pos_embed(torch_files.to_numpy(v), grid) if k in _POS_KEYS else v
           for k, v in state.items()}
  # The abstract backbone given to the key table.
  # The key tables name one 'block_{i}' per block; the model stacks each run of blocks.
  abstract = {'backbone': vit.unstack_blocks(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.tree.map(_leaf_value, params['backbone'], is_leaf=_is_box)), model_config)}
  converted, report = keymap.map_state_dict(state, abstract, rules, ignored,
                                            to_array=torch_files.to_numpy)
  error = report.error()
  if error:
    raise UserError(f'{_FLAG}={path} does not fit the backbone of config.model (embed_dim '
                    f'{model_config.embed_dim}, depth {model_config.depth}, '
                    f'{model_config.num_heads} heads): {error}')
  # The converted backbone returned, in the layout of `params['backbone']`.
  flatten = lambda tree: {'/'.join(str(k.key) for k in p): v
                          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  flat = flatten(vit.stack_blocks(converted['backbone'], model_config))

  def replace(key_path, old):
    value = _leaf_value(old)
    array = jnp.asarray(flat['/'.join(str(k.key) for k in key_path)], dtype=value.dtype)
    if isinstance(value, jax.Array):
      array = jax.device_put(array, value.sharding)
    return old.replace_boxed(array) if _is_box(old) else array

  backbone = jax.tree_util.tree_map_with_path(replace, params['backbone'], is_leaf=_is_box)
  logging.info('%s', _summary(path, flatten(converted['backbone']), params.get('head', {}),
                               report.ignored))
  return {**params, 'backbone': backbone}
