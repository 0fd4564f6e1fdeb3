r"""Official SegViT checkpoints (mmseg/mmcv `.pth`) -> segvit_jax parameters, and backbone inits.

    python -m segvit_jax.convert ade_51.3.pth /tmp/ade_vitb [--config=configs/ade20k_base.py]

writes DST_DIR/
  params/       the parameters {'backbone': ..., 'head': ...}, an Orbax StandardCheckpointer item
  config.json   the full segvit_jax config the parameters belong to (read back by `load_converted`)
  config.py     `get_config()` returning that config, for `--config=DST_DIR/config.py`
  meta.json     class names, palette, source file, and the keys that were ignored

Without `--config` the architecture comes from the checkpoint itself: `meta['config']` holds the
mmcv config as Python text, which is parsed with `ast` (literals and `dict(...)` only, nothing is
executed) and cross-checked against the tensor shapes. The conversion is strict: every tensor of
the state dict maps to exactly one parameter or is explicitly ignored, every parameter is filled,
and all missing, unexpected and mis-shaped keys are reported in one error. Nothing is written
when anything is wrong.

Python API:
    model, variables, config = load_torch_checkpoint('ade_51.3.pth')
    scores = model.apply(variables, images, train=False)      # (B, H, W, K)
    model, variables, config = load_converted('/tmp/ade_vitb')
    params = load_pretrained_backbone(params, 'L_16-...-res_384.npz', config.model)

Memory: the checkpoint is memory-mapped (`torch.load(mmap=True)`) and only the state dict's tensors
are read, one at a time, so the optimizer state (two thirds of a release file) is never loaded.
PyTorch is needed for `.pth` files only; AugReg `.npz` backbones load with numpy.
"""

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax import config_base
from segvit_jax import fileio
from segvit_jax import resize
from segvit_jax.models import segvit
from segvit_jax.models import vit

Shape = Tuple[int, ...]
FORMAT = 'segvit_jax.convert/1'
PARAMS_DIR = 'params'


class ConversionError(ValueError):
  """A checkpoint, config or output directory that cannot be converted; the message says why."""


# ------------------------------------------------------------------------------------------------
# Reading checkpoints.


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
        'Reading a PyTorch .pth file needs the CPU build of torch (pip install -r '
        'requirements-test.txt); AugReg .npz backbones load without it.') from e
  return torch


def read_torch_file(path: str, allow_pickle: bool = False) -> Any:
  """torch.load with mmap (tensors stay on disk until touched) and the safe unpickler."""
  torch = _import_torch()
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file.')
  kwargs = dict(map_location='cpu', weights_only=not allow_pickle)
  try:
    return torch.load(path, mmap=True, **kwargs)
  except RuntimeError as e:
    if 'mmap' not in str(e):  # legacy (non-zip) files cannot be mapped; anything else is fatal
      raise _unreadable(path, e) from e
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, e, allow_pickle) from e
  logging.warning('%s is in the legacy torch format: loading it whole (no mmap).', path)
  try:
    return torch.load(path, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, e, allow_pickle) from e


def _unreadable(path, error, allow_pickle=True) -> ConversionError:
  size = os.path.getsize(path)
  hint = ''
  if not allow_pickle and 'weights_only' in str(error):
    hint = (' The file holds Python objects beyond tensors and plain containers; if you trust '
            'it, pass --allow_pickle.')
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return ConversionError(
      f'{path} ({size} bytes) cannot be read as a PyTorch checkpoint: {first_line}. '
      f'Is the file complete (not truncated) and a torch.save() file?{hint}')


def split_checkpoint(obj: Any, path: str) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
  """(state_dict, meta) of an mmcv checkpoint dict or a bare state dict."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict.')
  if 'state_dict' in obj:
    state, meta = obj['state_dict'], obj.get('meta') or {}
  elif 'model' in obj and isinstance(obj['model'], Mapping):
    state, meta = obj['model'], obj.get('meta') or {}
  else:
    state, meta = obj, {}
  if not isinstance(state, Mapping) or not state:
    raise ConversionError(f'{path}: the state dict is empty or not a dict.')
  bad = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if bad:
    raise ConversionError(f'{path}: state dict entries that are not tensors: {bad[:5]}.')
  if any(k.startswith('module.') for k in state):  # a DDP wrapper saved without mmcv
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
  return state, dict(meta) if isinstance(meta, Mapping) else {}


def to_numpy(tensor) -> np.ndarray:
  """A float32 numpy copy of one (possibly memory-mapped, possibly half) torch tensor."""
  return np.array(tensor.detach().float().numpy(), dtype=np.float32, copy=True)


# ------------------------------------------------------------------------------------------------
# mmcv config text (meta['config']) -> Python values, without executing anything.


class _Unsupported(Exception):
  pass


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


# Side-effect-free builtins that raw mmcv configs apply to literals, e.g. `len(out_indices)`.
_PURE_BUILTINS = {'len': len, 'min': min, 'max': max, 'abs': abs, 'int': int, 'float': float,
                  'tuple': tuple, 'list': list}


def _literal(node: ast.AST, names: Mapping[str, Any]) -> Any:
  """Evaluates literals, dict(...), names bound earlier, number arithmetic and a few pure
  builtins (`len`, `min`, ...) on such values; nothing else."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
    items = [_literal(e, names) for e in node.elts]
    return tuple(items) if isinstance(node, ast.Tuple) else items
  if isinstance(node, ast.Dict):
    out = {}
    for k, v in zip(node.keys, node.values):
      if k is None:  # {**other}
        out.update(_literal(v, names))
      else:
        out[_literal(k, names)] = _literal(v, names)
    return out
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict':
    if node.args:
      raise _Unsupported('dict() with positional arguments')
    out = {}
    for kw in node.keywords:
      if kw.arg is None:
        out.update(_literal(kw.value, names))
      else:
        out[kw.arg] = _literal(kw.value, names)
    return out
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id in _PURE_BUILTINS and not node.keywords):
    return _PURE_BUILTINS[node.func.id](*[_literal(a, names) for a in node.args])
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    value = _literal(node.operand, names)
    if not isinstance(value, (int, float)):
      raise _Unsupported('sign of a non-number')
    return -value if isinstance(node.op, ast.USub) else value
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    a, b = _literal(node.left, names), _literal(node.right, names)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
      raise _Unsupported('arithmetic on non-numbers')
    return _BINOPS[type(node.op)](a, b)
  if isinstance(node, ast.Name) and node.id in names:
    return names[node.id]
  raise _Unsupported(type(node).__name__)


def parse_mmcv_config(text: str) -> Dict[str, Any]:
  """Top-level `name = value` assignments of an mmcv config text, as plain Python values.

  Only literals, `dict(...)`, names assigned earlier, arithmetic on numbers and `len`/`min`/...
  of those are understood; assignments using anything else (`range(...)`, attribute access,
  `__import__`, ...) are left out, never evaluated.
  """
  try:
    tree = ast.parse(text)
  except SyntaxError as e:
    raise ConversionError(f"meta['config'] is not valid Python config text: {e}") from e
  names: Dict[str, Any] = {}
  for stmt in tree.body:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(
        stmt.targets[0], ast.Name):
      try:
        names[stmt.targets[0].id] = _literal(stmt.value, names)
      except _Unsupported:
        pass
  return names


# mmseg dataset classes -> (segvit_jax dataset recipe in config_base, K it implies).
_DATASETS = {
    'ADE20KDataset': ('ade20k', 150),
    'COCOStuffDataset': ('coco_stuff10k', 171),
    'PascalContextDataset': ('pascal_context', 60),
    'PascalContextDataset59': ('pascal_context', 59),
}


def _pair(value, what) -> Tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return (int(value[0]), int(value[1]))
  raise ConversionError(f'{what} = {value!r} is neither an int nor an (h, w) pair.')


def config_from_mmcv(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A segvit_jax config for the model (and recipe) an mmcv SegViT config describes."""
  model = cfg.get('model')
  if not isinstance(model, Mapping) or 'backbone' not in model or 'decode_head' not in model:
    raise ConversionError("meta['config'] has no model = dict(backbone=..., decode_head=...).")
  backbone, head = dict(model['backbone']), dict(model['decode_head'])
  kinds = (backbone.get('type'), head.get('type'))
  if None in kinds:
    raise ConversionError("meta['config'] does not name the backbone and head types (not a merged "
                          'mmcv config?); pass --config=configs/X.py.')
  if kinds == ('VisionTransformer', 'ATMHead'):
    name = 'segvit'
  elif kinds == ('vit_shrink', 'TPNATMHead'):
    name = 'segvit_shrunk'
  else:
    raise ConversionError(
        f'The checkpoint is a {kinds[0]} + {kinds[1]} model; segvit_jax converts SegViT only: '
        'VisionTransformer + ATMHead or vit_shrink + TPNATMHead.')

  problems = []
  def require(ok, message):
    if not ok:
      problems.append(message)

  # mmseg's defaults where the config leaves a field out.
  depth = int(backbone.get('num_layers', 12))
  out_indices = backbone.get('out_indices', -1)
  out_indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
  out_indices = [i + depth if i < 0 else i for i in out_indices]
  eps = dict(backbone.get('norm_cfg') or {}).get('eps', 1e-5)
  require(not backbone.get('with_cls_token', True),
          'backbone.with_cls_token must be False (the cls token would run through the blocks)')
  require(not backbone.get('final_norm', False), 'backbone.final_norm must be False')
  require(not backbone.get('patch_norm', False), 'backbone.patch_norm must be False')
  require(not backbone.get('pre_norm', False), 'backbone.pre_norm must be False')
  require(backbone.get('qkv_bias', True), 'backbone.qkv_bias must be True')
  require(backbone.get('interpolate_mode', 'bicubic') == 'bicubic',
          'backbone.interpolate_mode must be bicubic')
  require(abs(eps - 1e-6) < 1e-12, f'backbone.norm_cfg.eps is {eps}; the JAX ViT uses 1e-6')
  require(int(backbone.get('num_fcs', 2)) == 2, 'backbone.num_fcs must be 2')
  require(head.get('use_proj', True), 'decode_head.use_proj must be True')
  img_size = _pair(backbone.get('img_size', 224), 'backbone.img_size')
  head_size = _pair(head.get('img_size', img_size), 'decode_head.img_size')
  require(head_size == img_size,
          f'decode_head.img_size {head_size} differs from backbone.img_size {img_size}')
  require(int(head.get('in_channels', backbone.get('embed_dims', 768))) ==
          int(backbone.get('embed_dims', 768)),
          'decode_head.in_channels must equal backbone.embed_dims')
  if name == 'segvit_shrunk':
    require(int(head.get('shrink_ratio', 16)) == int(backbone.get('patch_size', 16)),
            'decode_head.shrink_ratio must equal the patch size')
  if 'num_classes' not in head:
    problems.append('decode_head.num_classes is not set')
  if problems:
    raise ConversionError('Unsupported SegViT config in the checkpoint: ' + '; '.join(problems))

  config = config_base.get_base_config()
  dataset_type = cfg.get('dataset_type') or dict(dict(cfg.get('data') or {}).get(
      'train') or {}).get('type')
  if dataset_type in _DATASETS:
    recipe, k = _DATASETS[dataset_type]
    if recipe == 'coco_stuff10k':
      config_base.coco_stuff10k(config)
    elif recipe == 'pascal_context':
      config_base.pascal_context(config)
      if k == 59:
        config.dataset.tfds_name = 'pascal_context/59'
        config.dataset.reduce_zero_label = True

  m = config.model
  m.name = name
  m.img_size = img_size
  m.patch_size = int(backbone.get('patch_size', 16))
  m.embed_dim = int(backbone.get('embed_dims', 768))
  m.depth = depth
  m.num_heads = int(backbone.get('num_heads', 12))
  m.mlp_ratio = int(backbone.get('mlp_ratio', 4))
  m.drop_path_rate = float(backbone.get('drop_path_rate', 0.0))
  use_stages = int(head.get('use_stages', 3))
  # Both the official and the JAX heads read the FIRST use_stages taps: later taps are unused.
  m.out_indices = tuple(out_indices[:use_stages])
  m.use_stages = use_stages
  m.shrink_index = int(backbone.get('shrink_idx', 8)) if name == 'segvit_shrunk' else -1
  m.decoder_dim = int(head.get('embed_dims', 768))
  m.decoder_heads = int(head.get('num_heads', 8))
  m.decoder_layers = int(head.get('num_layers', 3))
  m.num_classes = int(head['num_classes'])
  config.dataset.num_classes = m.num_classes

  loss = dict(head.get('loss_decode') or {})
  if loss.get('type') == 'ATMLoss':
    scale = float(loss.get('loss_weight', 1.0))
    config.loss.cls_weight = scale * float(loss.get('cls_weight', 1.0))
    config.loss.mask_weight = scale * float(loss.get('mask_weight', 20.0))
    config.loss.dice_weight = scale * float(loss.get('dice_weight', 1.0))

  norm = cfg.get('img_norm_cfg')
  if isinstance(norm, Mapping) and 'mean' in norm and 'std' in norm:
    config.dataset.mean = tuple(float(x) for x in norm['mean'])
    config.dataset.std = tuple(float(x) for x in norm['std'])
    if not norm.get('to_rgb', True):
      logging.warning('img_norm_cfg.to_rgb is False: the checkpoint was trained on BGR input, '
                      'segvit_jax feeds RGB.')

  test_cfg = dict(model.get('test_cfg') or {})
  if test_cfg.get('mode') in ('slide', 'whole'):
    config.eval.mode = test_cfg['mode']
  if 'crop_size' in test_cfg:
    config.eval.crop_size = _pair(test_cfg['crop_size'], 'test_cfg.crop_size')
  if 'stride' in test_cfg:
    config.eval.stride = _pair(test_cfg['stride'], 'test_cfg.stride')

  optimizer = dict(cfg.get('optimizer') or {})
  if 'lr' in optimizer:
    config.optim.learning_rate = float(optimizer['lr'])
  if 'weight_decay' in optimizer:
    config.optim.weight_decay = float(optimizer['weight_decay'])
  lr_config = dict(cfg.get('lr_config') or {})
  for src, dst in (('power', 'poly_power'), ('warmup_iters', 'warmup_steps'),
                   ('warmup_ratio', 'warmup_ratio'), ('min_lr', 'min_lr')):
    if src in lr_config:
      config.optim[dst] = type(config.optim[dst])(lr_config[src])
  clip = dict(dict(cfg.get('optimizer_config') or {}).get('grad_clip') or {})
  if 'max_norm' in clip:
    config.optim.grad_clip_norm = float(clip['max_norm'])
  runner = dict(cfg.get('runner') or {})
  if 'max_iters' in runner:
    config.num_train_steps = int(runner['max_iters'])
  return config


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a segvit_jax config file (configs/*.py; trusted code, as for main)."""
  if not os.path.isfile(path):
    raise ConversionError(f'--config {path}: no such file.')
  spec = importlib.util.spec_from_file_location('_segvit_convert_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConversionError(f'--config {path} has no get_config().')
  return module.get_config()


# ------------------------------------------------------------------------------------------------
# The key table: official state-dict key -> flax parameter path(s) + layout transform.
#
# Each transform knows the flax shapes it must produce (read off the model's abstract parameters),
# so head counts need no config: (d, H, hd) kernels carry H. `torch_shape` gives the official
# shape those flax shapes imply, which is what a source tensor is checked against.


@dataclasses.dataclass(frozen=True)
class Transform:
  suffixes: Tuple[str, ...]  # flax leaves written, relative to the rule's target path
  torch_shape: Callable[[Sequence[Shape]], Shape]
  apply: Callable[[np.ndarray, Sequence[Shape]], Sequence[np.ndarray]]


def _heads_in(w, shape):  # Linear (H*hd, d_in) -> (d_in, H, hd); bias (H*hd,) -> (H, hd)
  return w.T.reshape(shape) if w.ndim == 2 else w.reshape(shape)


T_COPY = Transform(('',), lambda s: s[0], lambda x, s: [x])
T_DENSE_KERNEL = Transform(('',), lambda s: s[0][::-1], lambda x, s: [x.T])
T_CONV = Transform(  # (O, I, kh, kw) -> (kh, kw, I, O)
    ('',), lambda s: (s[0][3], s[0][2], s[0][0], s[0][1]),
    lambda x, s: [x.transpose(2, 3, 1, 0)])
T_HEADS_KERNEL = Transform(  # q / k / v Linear weight -> (d_in, H, hd)
    ('',), lambda s: (s[0][1] * s[0][2], s[0][0]), lambda x, s: [_heads_in(x, s[0])])
T_HEADS_BIAS = Transform(('',), lambda s: (s[0][0] * s[0][1],), lambda x, s: [x.reshape(s[0])])
T_OUT_KERNEL = Transform(  # out_proj / proj weight (d_out, H*hd) -> (H, hd, d_out)
    ('',), lambda s: (s[0][2], s[0][0] * s[0][1]), lambda x, s: [x.T.reshape(s[0])])
_QKV = ('/query/kernel', '/key/kernel', '/value/kernel')
_QKV_BIAS = ('/query/bias', '/key/bias', '/value/bias')
T_IN_PROJ_KERNEL = Transform(  # stacked rows [q; k; v] (3 H hd, d_in)
    _QKV, lambda s: (3 * s[0][1] * s[0][2], s[0][0]),
    lambda x, s: [_heads_in(part, shape) for part, shape in zip(np.split(x, 3, axis=0), s)])
T_IN_PROJ_BIAS = Transform(
    _QKV_BIAS, lambda s: (3 * s[0][0] * s[0][1],),
    lambda x, s: [part.reshape(shape) for part, shape in zip(np.split(x, 3), s)])


def _linear(src: str, dst: str):
  return [(src + '.weight', dst + '/kernel', T_DENSE_KERNEL),
          (src + '.bias', dst + '/bias', T_COPY)]


def _norm(src: str, dst: str):
  return [(src + '.weight', dst + '/scale', T_COPY), (src + '.bias', dst + '/bias', T_COPY)]


def _torch_mha(src: str, dst: str):
  """torch nn.MultiheadAttention (stacked in_proj) -> Attention(query, key, value, out)."""
  return [(src + '.in_proj_weight', dst, T_IN_PROJ_KERNEL),
          (src + '.in_proj_bias', dst, T_IN_PROJ_BIAS),
          (src + '.out_proj.weight', dst + '/out/kernel', T_OUT_KERNEL),
          (src + '.out_proj.bias', dst + '/out/bias', T_COPY)]


def _atm_attention(src: str, dst: str):
  """SegViT's `Attention` (separate q, k, v, proj Linear) -> Attention(query, key, value, out)."""
  rules = []
  for a, b in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    rules += [(f'{src}.{a}.weight', f'{dst}/{b}/kernel', T_HEADS_KERNEL),
              (f'{src}.{a}.bias', f'{dst}/{b}/bias', T_HEADS_BIAS)]
  return rules + [(src + '.proj.weight', dst + '/out/kernel', T_OUT_KERNEL),
                  (src + '.proj.bias', dst + '/out/bias', T_COPY)]


def _decoder_layer(src: str, dst: str, standard_cross_attn: bool):
  rules = (_torch_mha(src + '.self_attn', dst + '/self_attn')
           + _linear(src + '.linear1', dst + '/linear1')
           + _linear(src + '.linear2', dst + '/linear2'))
  for n in (1, 2, 3):
    rules += _norm(f'{src}.norm{n}', f'{dst}/norm{n}')
  cross = _torch_mha if standard_cross_attn else _atm_attention
  return rules + cross(src + '.multihead_attn', dst + '/cross_attn')


# Rules are (official key template, flax path template, transform); `{i}`, `{s}`, `{l}` stand for
# block, stage and layer numbers.


def backbone_rules(prefix: str = 'backbone.'):
  """mmseg VisionTransformer (also vit_shrink: same keys) -> params['backbone']."""
  block, dst = prefix + 'layers.{i}', 'backbone/block_{i}'
  return ([(prefix + 'cls_token', 'backbone/cls_token', T_COPY),
           (prefix + 'pos_embed', 'backbone/pos_embed', T_COPY),
           (prefix + 'patch_embed.projection.weight', 'backbone/patch_embed/kernel', T_CONV),
           (prefix + 'patch_embed.projection.bias', 'backbone/patch_embed/bias', T_COPY)]
          + _norm(block + '.ln1', dst + '/ln1') + _norm(block + '.ln2', dst + '/ln2')
          + _torch_mha(block + '.attn.attn', dst + '/attn')
          + _linear(block + '.ffn.layers.0.0', dst + '/mlp/fc1')
          + _linear(block + '.ffn.layers.1', dst + '/mlp/fc2'))


def head_rules(name: str):
  """ATMHead ('segvit') or TPNATMHead + ATMSingleHead ('segvit_shrunk') -> params['head']."""
  qu = name == 'segvit_shrunk'
  rules = (_linear('decode_head.input_proj_{s}', 'head/input_proj_{s}')
           + _norm('decode_head.proj_norm_{s}', 'head/proj_norm_{s}')
           + [('decode_head.q.weight', 'head/queries', T_COPY)]
           + _decoder_layer('decode_head.decoder_{s}.layers.{l}', 'head/decoder_{s}/layer_{l}',
                            standard_cross_attn=qu))
  if qu:  # the ATMSingleHead: no input_proj / proj_norm (Identity), its own queries
    rules += ([('decode_head.atm.q.weight', 'head/atm/queries', T_COPY)]
              + _linear('decode_head.atm.class_embed', 'head/atm/class_embed')
              + _decoder_layer('decode_head.atm.decoder_1.layers.{l}',
                               'head/atm/decoder_1/layer_{l}', False))
  else:
    rules += _linear('decode_head.class_embed', 'head/class_embed')
  return rules


def augreg_rules():
  """Google AugReg ViT .npz (flax layouts already: names change, arrays do not)."""
  block, dst = 'Transformer/encoderblock_{i}/', 'backbone/block_{i}/'
  rules = [('embedding/kernel', 'backbone/patch_embed/kernel', T_COPY),  # HWIO as flax Conv
           ('embedding/bias', 'backbone/patch_embed/bias', T_COPY),
           ('cls', 'backbone/cls_token', T_COPY),
           ('Transformer/posembed_input/pos_embedding', 'backbone/pos_embed', T_COPY)]
  for p in ('kernel', 'bias'):
    for n in ('query', 'key', 'value', 'out'):
      rules.append((f'{block}MultiHeadDotProductAttention_1/{n}/{p}', f'{dst}attn/{n}/{p}', T_COPY))
    rules += [(f'{block}MlpBlock_3/Dense_0/{p}', f'{dst}mlp/fc1/{p}', T_COPY),
              (f'{block}MlpBlock_3/Dense_1/{p}', f'{dst}mlp/fc2/{p}', T_COPY)]
  for p in ('scale', 'bias'):
    rules += [(f'{block}LayerNorm_0/{p}', f'{dst}ln1/{p}', T_COPY),
              (f'{block}LayerNorm_2/{p}', f'{dst}ln2/{p}', T_COPY)]
  return rules


# Tensors that have no counterpart in segvit_jax, on purpose (regular expressions).
IGNORED = (
    (r'decode_head\.(atm\.)?loss_decode\.criterion\.empty_weight',
     'ATM loss buffer (no-object weight -> config.loss.no_object_weight)'),
)
AUGREG_IGNORED = (
    (r'Transformer/encoder_norm/(scale|bias)', 'final encoder norm (final_norm=False)'),
    (r'head/(kernel|bias)', 'ImageNet classifier'),
    (r'pre_logits/(kernel|bias)', 'pre-logits layer'),
)
MMSEG_VIT_IGNORED = (
    (r'ln1\.(weight|bias)', 'final encoder norm (final_norm=False)'),
)


def _template_regex(template: str) -> 're.Pattern':
  parts = re.split(r'\{(\w+)\}', template)
  return re.compile(''.join(re.escape(p) if k % 2 == 0 else rf'(?P<{p}>\d+)'
                            for k, p in enumerate(parts)))


@dataclasses.dataclass(frozen=True)
class _Rule:
  source: 're.Pattern'
  source_template: str
  target: 're.Pattern'  # matches every flax leaf the rule writes
  target_template: str
  transform: Transform


def _compile(rules) -> List[_Rule]:
  out = []
  for src, dst, transform in rules:
    leaves = '|'.join(re.escape(s) for s in transform.suffixes)
    target = _template_regex(dst).pattern + (f'(?:{leaves})' if leaves else '')
    out.append(_Rule(_template_regex(src), src, re.compile(target), dst, transform))
  return out


def _source_for(table: Sequence[_Rule], path: str):
  """(official key, rule, flax base path) of the rule that fills flax leaf `path`, or None."""
  for rule in table:
    m = rule.target.fullmatch(path)
    if m:
      groups = m.groupdict()
      return (rule.source_template.format(**groups), rule,
              rule.target_template.format(**groups))
  return None


def _flat_shapes(tree) -> Dict[str, Shape]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(k.key) for k in path): tuple(x.shape) for path, x in flat}


def _unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _fmt(shape) -> str:
  return '(' + ', '.join(str(int(s)) for s in shape) + (',)' if len(shape) == 1 else ')')


@dataclasses.dataclass
class KeyReport:
  missing: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  mismatched: List[str] = dataclasses.field(default_factory=list)
  ignored: List[str] = dataclasses.field(default_factory=list)

  def error(self, limit: int = 40) -> Optional[str]:
    sections = []
    for title, items in (('missing', self.missing), ('unexpected', self.unexpected),
                         ('wrong shape', self.mismatched)):
      if items:
        shown = items[:limit] + ([f'... and {len(items) - limit} more'] if len(items) > limit
                                 else [])
        sections.append(f'{len(items)} {title}:\n  ' + '\n  '.join(shown))
    return '\n'.join(sections) or None


def convert_state_dict(state: Mapping[str, Any], abstract_params, name: str,
                       rules: Optional[list] = None, ignored=IGNORED,
                       to_array: Callable[[Any], np.ndarray] = to_numpy,
                       ) -> Tuple[Dict[str, Any], KeyReport]:
  """Maps every tensor of `state` onto the flax tree `abstract_params` (anything with .shape).

  Returns (params as a nested dict of float32 jax arrays, report). Nothing is converted when
  the report has an error (the caller raises it); otherwise tensors are read one at a time.
  """
  expected: Dict[str, Optional[Shape]] = dict(_flat_shapes(abstract_params))
  shapes = dict(expected)
  table = _compile(rules if rules is not None else backbone_rules() + head_rules(name))
  ignore = [(re.compile(p), why) for p, why in ignored]
  report = KeyReport()
  plan = []
  for key, tensor in state.items():
    src_shape = tuple(tensor.shape)
    rule, match = next(((r, r.source.fullmatch(key)) for r in table if r.source.fullmatch(key)),
                       (None, None))
    if rule is None:
      why = next((why for p, why in ignore if p.fullmatch(key)), None)
      if why is not None:
        report.ignored.append(f'{key} {_fmt(src_shape)}: {why}')
      else:
        report.unexpected.append(f'{key} {_fmt(src_shape)}: no rule maps it to a parameter')
      continue
    base = rule.target_template.format(**match.groupdict())
    targets = [base + s for s in rule.transform.suffixes]
    absent = [t for t in targets if t not in shapes]
    if absent:
      report.unexpected.append(f'{key} {_fmt(src_shape)}: the model has no {absent[0]}')
      continue
    want = tuple(rule.transform.torch_shape([shapes[t] for t in targets]))
    for t in targets:
      expected[t] = None  # accounted for, whether or not its shape fits
    if src_shape != want:
      report.mismatched.append(
          f'{key}: checkpoint {_fmt(src_shape)}, model expects {_fmt(want)} (-> {base})')
      continue
    plan.append((key, targets, rule.transform))
  missing = {}  # official key -> (its expected shape, flax leaves it would fill)
  for path, shape in expected.items():
    if shape is None:
      continue
    found = _source_for(table, path)
    if found is None:
      missing[path] = (shape, [path])
      continue
    key, rule, base = found
    leaves = [base + s for s in rule.transform.suffixes]
    missing.setdefault(key, (tuple(rule.transform.torch_shape([shapes[t] for t in leaves])),
                             leaves))
  for key, (shape, leaves) in missing.items():
    report.missing.append(f'{key} {_fmt(shape)} -> {", ".join(leaves)}')
  if report.error():
    return {}, report
  flat = {}
  for key, targets, transform in plan:
    arrays = transform.apply(to_array(state[key]), [shapes[t] for t in targets])
    for t, a in zip(targets, arrays):
      # Straight to a device array: the host copy is dropped at once, so converting never holds
      # more than one tensor twice (and Orbax saves device arrays without another copy).
      flat[t] = jnp.asarray(np.ascontiguousarray(a, dtype=np.float32))
  return _unflatten(flat), report


# ------------------------------------------------------------------------------------------------
# Whole checkpoints.


def abstract_variables(model_config: ml_collections.ConfigDict):
  """(model, abstract variables) of a model config, without allocating parameters."""
  model = segvit.build_model(model_config)
  return model, {'params': nn.unbox(segvit.abstract_params(model))}


def _state_kind(state: Mapping[str, Any]) -> Optional[str]:
  if 'decode_head.atm.q.weight' in state:
    return 'segvit_shrunk'
  if 'decode_head.q.weight' in state and 'decode_head.class_embed.weight' in state:
    return 'segvit'
  return None


def check_config_against_state(config: ml_collections.ConfigDict,
                               state: Mapping[str, Any], source: str) -> None:
  """Raises a ConversionError listing every model setting the tensors contradict."""
  m = config.model
  kind = _state_kind(state)
  if kind is None:
    head = sorted(k for k in state if k.startswith('decode_head.'))[:3]
    raise ConversionError(
        f'{source} is not a SegViT checkpoint: it has neither decode_head.q.weight (ATMHead) '
        f'nor decode_head.atm.q.weight (TPNATMHead). First keys: {list(state)[:4]}'
        + (f', head keys: {head}' if head else ', no decode_head.* keys') + '.')
  problems = []
  if kind != m.name:
    problems.append(f"model.name is '{m.name}' but the checkpoint is a '{kind}' model")
  shape = lambda k: tuple(state[k].shape) if k in state else None
  query_key = 'decode_head.atm.q.weight' if kind == 'segvit_shrunk' else 'decode_head.q.weight'
  queries = shape(query_key)
  if queries and queries[0] != m.num_classes:
    problems.append(f'model.num_classes is {m.num_classes} but the class queries ({query_key}) '
                    f'are {_fmt(queries)}: {queries[0]} classes')
  if queries and queries[1] != m.decoder_dim:
    problems.append(f'model.decoder_dim is {m.decoder_dim} but the class queries have width '
                    f'{queries[1]}')
  patch = shape('backbone.patch_embed.projection.weight')
  if patch and patch[0] != m.embed_dim:
    problems.append(f'model.embed_dim is {m.embed_dim} but backbone.patch_embed.projection.weight '
                    f'is {_fmt(patch)}')
  if patch and patch[2:] != (m.patch_size, m.patch_size):
    problems.append(f'model.patch_size is {m.patch_size} but the patch kernel is {patch[2:]}')
  blocks = {int(x.group(1)) for x in (re.match(r'backbone\.layers\.(\d+)\.', k) for k in state)
            if x}
  if blocks and max(blocks) + 1 != m.depth:
    problems.append(f'model.depth is {m.depth} but the checkpoint has {max(blocks) + 1} blocks')
  pos = shape('backbone.pos_embed')
  gh, gw = (s // m.patch_size for s in m.img_size)
  if pos and pos[1] != 1 + gh * gw:
    side = math.isqrt(pos[1] - 1)
    guess = (f' (a {side}x{side} grid: img_size {side * m.patch_size})'
             if side * side == pos[1] - 1 else '')
    problems.append(f'model.img_size {tuple(m.img_size)} needs a {gh}x{gw} position grid '
                    f'({1 + gh * gw} rows) but backbone.pos_embed is {_fmt(pos)}{guess}')
  if kind == 'segvit_shrunk':
    qu = shape('decode_head.q.weight')
    if qu and qu[0] != gh * gw:
      problems.append(f'model.img_size {tuple(m.img_size)} needs {gh * gw} QU queries but '
                      f'decode_head.q.weight is {_fmt(qu)}')
  if problems:
    raise ConversionError(f'The config does not match {source}:\n  ' + '\n  '.join(problems))


def _no_object_weight(state, kind) -> Optional[float]:
  key = ('decode_head.atm.' if kind == 'segvit_shrunk' else 'decode_head.') + (
      'loss_decode.criterion.empty_weight')
  if key in state and tuple(state[key].shape) and state[key].shape[0] > 0:
    return float(to_numpy(state[key])[-1])
  return None


def _as_config(config) -> Optional[ml_collections.ConfigDict]:
  if config is None or isinstance(config, ml_collections.ConfigDict):
    return config
  if isinstance(config, str):
    return load_config_file(config)
  raise ConversionError(f'config must be a ConfigDict or a config file path, not {type(config)}.')


def _json_safe(value):
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.ndarray, np.integer, np.floating)):
    return _json_safe(value.tolist())
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)


def convert_checkpoint(path: str, config=None, allow_pickle: bool = False):
  """(params tree, config, meta dict) of an official checkpoint; raises ConversionError."""
  state, meta = split_checkpoint(read_torch_file(path, allow_pickle), path)
  config = _as_config(config)
  if config is None:
    text = meta.get('config')
    if not isinstance(text, str):
      raise ConversionError(
          f"{path} has no meta['config'] text (a bare state dict?): pass --config=configs/X.py "
          'to say which architecture it is.')
    config = config_from_mmcv(parse_mmcv_config(text))
    origin = "the checkpoint's meta['config']"
  else:
    config = ml_collections.ConfigDict(config.to_dict())  # never modify the caller's config
    origin = 'the given config'
  check_config_against_state(config, state, path)
  try:
    segvit.check_model_config(config.model)
  except ValueError as e:
    raise ConversionError(f'{origin}: {e}') from e
  model, abstract = abstract_variables(config.model)
  # The key table names one block / decoder layer per official layer; the model stacks them.
  per_layer = segvit.unstack_params(abstract['params'], config.model)
  params, report = convert_state_dict(state, per_layer, config.model.name)
  error = report.error()
  if error:
    raise ConversionError(f'{path} does not fit the model of {origin} '
                          f'({config.model.name}):\n{error}')
  params = segvit.stack_params(params, config.model)
  eos = _no_object_weight(state, config.model.name)
  if eos is not None:
    config.loss.no_object_weight = eos
  info = {
      'format': FORMAT,
      'source': os.path.abspath(path),
      'config_from': origin,
      'class_names': (_json_safe(list(meta['CLASSES'])) if meta.get('CLASSES') is not None
                      else None),
      'palette': _json_safe(meta['PALETTE']) if meta.get('PALETTE') is not None else None,
      'ignored': report.ignored,
      'mmcv_meta': {k: _json_safe(meta[k]) for k in ('mmseg_version', 'mmcv_version', 'iter',
                                                       'epoch', 'exp_name') if k in meta},
  }
  if info['class_names'] and len(info['class_names']) != config.model.num_classes:
    logging.warning("meta['CLASSES'] names %d classes, the model has %d; names not kept.",
                    len(info['class_names']), config.model.num_classes)
    info['class_names'] = info['palette'] = None
  config.convert = ml_collections.ConfigDict({
      'source': info['source'],
      'class_names': tuple(info['class_names'] or ()),
      'palette': tuple(tuple(c) for c in (info['palette'] or ())),
  })
  del model
  return params, config, info


def load_torch_checkpoint(path: str, config=None, allow_pickle: bool = False):
  """(model, variables, config) of an official SegViT `.pth`; `config` None reads it from meta.

  `config`: None, a full segvit_jax ConfigDict, or a config file path. The returned config has
  `config.convert.class_names` / `.palette` from the checkpoint's meta (empty when absent).
  """
  params, config, _ = convert_checkpoint(path, config, allow_pickle)
  model = segvit.build_model(config.model)
  return model, {'params': params}, config


# ------------------------------------------------------------------------------------------------
# The converted directory.

_CONFIG_PY = '''"""The config of the converted checkpoint in this directory (segvit_jax.convert)."""

import json
import os

import ml_collections


def _tuples(value):  # JSON has no tuples; the segvit_jax configs use them for sequences
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def get_config():
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
'''


def save_converted(dst_dir: str, params, config: ml_collections.ConfigDict, info: Mapping) -> None:
  """Writes DST_DIR atomically: everything goes to a sibling temp dir, renamed at the end."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  dst_dir = os.path.abspath(dst_dir)
  if os.path.exists(dst_dir) and (not os.path.isdir(dst_dir) or os.listdir(dst_dir)):
    raise ConversionError(f'{dst_dir} already exists and is not an empty directory; remove it or '
                          'choose another destination.')
  parent = os.path.dirname(dst_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst_dir) + '.partial-', dir=parent)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(tmp, 'config.py'), 'w') as f:
      f.write(_CONFIG_PY)
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(_json_safe(dict(info)), f, indent=2)
    if os.path.isdir(dst_dir):
      os.rmdir(dst_dir)  # empty, checked above
    os.rename(tmp, dst_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def is_converted_dir(path: str) -> bool:
  return all(fileio.exists(os.path.join(path, n)) for n in (PARAMS_DIR, 'config.json'))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_converted_config(path: str) -> ml_collections.ConfigDict:
  """The config saved next to converted parameters (sequences as tuples, as in config_base)."""
  with fileio.open_file(os.path.join(path, 'config.json')) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def restore_params(path: str, abstract_params=None):
  """The params tree of a converted directory; `abstract_params` (ShapeDtypeStructs, possibly
  with shardings) places and checks it, None restores numpy arrays as saved."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not is_converted_dir(path):
    raise ConversionError(f'{path} is not a directory written by segvit_jax.convert '
                          f'(needs {PARAMS_DIR}/ and config.json).')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(fileio.absolute(path), PARAMS_DIR), abstract_params)


def load_converted(path: str):
  """(model, variables, config) of a directory written by `python -m segvit_jax.convert`."""
  config = load_converted_config(path)
  model, abstract = abstract_variables(config.model)
  params = restore_params(path, abstract['params'])
  return model, {'params': jax.tree.map(jnp.asarray, params)}, config


# ------------------------------------------------------------------------------------------------
# Pretrained ViT backbones for training (reference section 10).

def _resize_pos_embed(table: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """(1, 1 + n*n, D) -> (1, 1 + gh*gw, D): cls slot kept, PyTorch-bicubic on the square grid."""
  side = math.isqrt(table.shape[1] - 1)
  if side * side != table.shape[1] - 1:
    raise ConversionError(f'pos_embed {table.shape} does not hold a square grid plus a cls slot.')
  if (side, side) == tuple(grid):
    return table
  patches = table[:, 1:].reshape(1, side, side, -1)
  patches = np.asarray(resize.resize_bicubic_torch(jnp.asarray(patches), grid))
  logging.info('Resized the pretrained position grid %dx%d -> %dx%d (bicubic, PyTorch kernel).',
               side, side, *grid)
  return np.concatenate([table[:, :1], patches.reshape(1, grid[0] * grid[1], -1)], axis=1)


def _read_backbone_file(path: str):
  """(state: name -> array-like, rules, ignored) of an AugReg .npz or an mmseg ViT .pth."""
  if path.endswith('.npz'):
    try:
      with np.load(path) as data:
        state = {k: np.asarray(data[k], np.float32) for k in data.files}
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'{path} cannot be read as an .npz file: {e}') from e
    return state, augreg_rules(), AUGREG_IGNORED
  if path.endswith(('.pth', '.pt', '.bin')):
    state, _ = split_checkpoint(read_torch_file(path), path)
    if any(k.startswith('backbone.') for k in state):  # e.g. a whole mmseg segmentor checkpoint
      state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return state, backbone_rules(prefix=''), MMSEG_VIT_IGNORED
  raise ConversionError(f'config.pretrained_backbone {path}: expected an AugReg .npz or an mmseg '
                        'ViT .pth file (by extension).')


def _leaf_value(x):
  return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def load_pretrained_backbone(params, path: str, model_config: ml_collections.ConfigDict):
  """`params` with its backbone replaced by a pretrained ViT; the head keeps its initialisation.

  Args:
    params: the model's params ({'backbone', 'head'}), arrays or boxed `nn.Partitioned`, possibly
      sharded: replaced leaves keep each original leaf's box and sharding.
    path: an AugReg `.npz` (e.g. 'L_16-i21k-...-res_384.npz') or an mmseg `vit_*_p16_384*.pth`.
    model_config: config.model; the stored 24x24 position grid is resized to img_size / 16 with
      PyTorch's bicubic kernel, as mmseg's `init_weights` does.

  Logs a table of loaded / initialised / ignored parameters.
  """
  state, rules, ignored = _read_backbone_file(path)
  backbone = jax.tree.map(_leaf_value, params['backbone'],
                          is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  abstract = {'backbone': vit.unstack_blocks(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), backbone), model_config)}
  grid = (model_config.img_size[0] // model_config.patch_size,
          model_config.img_size[1] // model_config.patch_size)
  pos_keys = ('Transformer/posembed_input/pos_embedding', 'pos_embed')
  state = dict(state)
  for k in pos_keys:
    if k in state:
      state[k] = _resize_pos_embed(to_numpy(state[k]) if not isinstance(state[k], np.ndarray)
                                   else state[k], grid)
  # QD adds no parameters: the plain ViT weights load into the shrunk backbone as they are.
  convert = lambda x: x if isinstance(x, np.ndarray) else to_numpy(x)
  loaded, report = convert_state_dict(state, abstract, model_config.name, rules=rules,
                                      ignored=ignored, to_array=convert)
  # The classifier-free ViT file has nothing for the head: only backbone keys can be missing.
  error = report.error()
  if error:
    raise ConversionError(f'{path} does not fit the backbone of config.model '
                          f'(embed_dim {model_config.embed_dim}, depth {model_config.depth}, '
                          f'{model_config.num_heads} heads):\n{error}')
  loaded_backbone = vit.stack_blocks(loaded['backbone'], model_config)
  flat_new = {'/'.join(str(k.key) for k in p): v
              for p, v in jax.tree_util.tree_flatten_with_path(loaded_backbone)[0]}

  def replace(path, old):
    name = '/'.join(str(k.key) for k in path)
    new = flat_new[name]
    value = _leaf_value(old)
    if tuple(new.shape) != tuple(value.shape):
      raise ConversionError(f'{path}: pretrained {new.shape} vs model {value.shape}')
    new = jnp.asarray(new, dtype=value.dtype)
    if isinstance(value, jax.Array) and hasattr(value, 'sharding'):
      new = jax.device_put(new, value.sharding)
    return old.replace_boxed(new) if isinstance(old, nn.meta.AxisMetadata) else new

  new_backbone = jax.tree_util.tree_map_with_path(
      replace, params['backbone'], is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  head_count = len(jax.tree_util.tree_leaves(
      params.get('head', {}), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
  head_size = sum(int(np.prod(_leaf_value(x).shape)) for x in jax.tree_util.tree_leaves(
      params.get('head', {}), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
  lines = [f'Pretrained backbone from {path}:',
           f'  loaded       {len(jax.tree_util.tree_leaves(loaded["backbone"])):4d} tensors  '
           f'{sum(int(v.size) for v in flat_new.values()):>12,d} params  (backbone)',
           f'  initialised  {head_count:4d} tensors  {head_size:>12,d} params  (head, fresh)',
           f'  ignored      {len(report.ignored):4d} tensors'] + [
               f'    {line}' for line in report.ignored]
  logging.info('\n'.join(lines))
  out = dict(params)
  out['backbone'] = new_backbone
  return out


# ------------------------------------------------------------------------------------------------
# Command line.


def convert_to_dir(src: str, dst: str, config=None, allow_pickle: bool = False) -> str:
  """Converts `src` and writes `dst`; returns a one-line summary. Raises ConversionError."""
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise ConversionError(f'{dst} already exists and is not an empty directory; remove it or '
                          'choose another destination.')
  params, config, info = convert_checkpoint(src, config, allow_pickle)
  save_converted(dst, params, config, info)
  m = config.model
  backbone, head = segvit.param_counts(params)
  return (f'Converted {src} -> {dst}: {m.name}, ViT {m.embed_dim}x{m.depth}, img_size '
          f'{tuple(m.img_size)}, {m.num_classes} classes, {backbone + head:,} parameters '
          f'(backbone {backbone:,}, head {head:,}); config from {info["config_from"]}; '
          f'{len(info["ignored"])} tensors ignored.')


def main(argv: Sequence[str], config=None, allow_pickle: bool = False) -> int:
  """CLI body: argv = [prog, SRC, DST_DIR]. Exit status 0, 1 (conversion error) or 2 (usage)."""
  if len(argv) != 3:
    print('usage: python -m segvit_jax.convert SRC.pth DST_DIR [--config=configs/X.py] '
          '[--allow_pickle]', file=sys.stderr)
    return 2
  try:
    print(convert_to_dir(argv[1], argv[2], config, allow_pickle))
  except ConversionError as e:
    print(f'segvit_jax.convert: error: {e}', file=sys.stderr)
    return 1
  return 0


def _run():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, 'segvit_jax config file; default: read meta["config"] of the checkpoint.',
      lock_config=False)
  flags.DEFINE_bool('allow_pickle', False,
                    'Unpickle arbitrary objects in the checkpoint (only for files you trust).')
  app.run(lambda argv: sys.exit(main(argv, flags.FLAGS.config, flags.FLAGS.allow_pickle)))


if __name__ == '__main__':
  _run()
