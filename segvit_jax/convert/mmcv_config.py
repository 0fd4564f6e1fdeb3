"""Official mmcv configs -> segvit_jax configs, without executing them.

An mmseg checkpoint stores its merged config as Python text (`meta['config']`). `parse` reads its
top-level assignments with `ast` (literals, `dict(...)`, names bound earlier, arithmetic, `len`
and the like; nothing is executed), and `to_config` maps the SegViT model (mmseg
`VisionTransformer` + `ATMHead`, or `vit_shrink` + `TPNATMHead`) and its recipe onto
`segvit_jax.config`'s keys, with mmseg's defaults where the text leaves a field out.
"""

import ast
from typing import Any, Dict, Mapping, Tuple

from absl import logging
import ml_collections

from segvit_jax import config as config_lib
from segvit_jax.data import datasets
from segvit_jax.errors import UserError


class _Unsupported(Exception):
  pass


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

# Side-effect-free builtins that raw mmcv configs apply to literals, e.g. `len(out_indices)`.
_PURE_BUILTINS = {'len': len, 'min': min, 'max': max, 'abs': abs, 'int': int, 'float': float,
                  'tuple': tuple, 'list': list}


def _dict_call(node: ast.Call, names: Mapping[str, Any]) -> dict:
  if node.args:
    raise _Unsupported('dict() with positional arguments')
  out = {}
  for kw in node.keywords:
    if kw.arg is None:  # dict(**other)
      out.update(_literal(kw.value, names))
    else:
      out[kw.arg] = _literal(kw.value, names)
  return out


def _number(value: Any) -> Any:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise _Unsupported('arithmetic on a non-number')
  return value


def _literal(node: ast.AST, names: Mapping[str, Any]) -> Any:
  """Evaluates literals, dict(...), names bound earlier, number arithmetic and a few pure
  builtins (`len`, `min`, ...) on such values; raises _Unsupported for anything else."""
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
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords and (
      node.func.id in _PURE_BUILTINS):
    return _PURE_BUILTINS[node.func.id](*[_literal(a, names) for a in node.args])
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict':
    return _dict_call(node, names)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    value = _number(_literal(node.operand, names))
    return -value if isinstance(node.op, ast.USub) else value
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    a, b = _number(_literal(node.left, names)), _number(_literal(node.right, names))
    return _BINOPS[type(node.op)](a, b)
  if isinstance(node, ast.Name) and node.id in names:
    return names[node.id]
  raise _Unsupported(type(node).__name__)


def parse(text: str) -> Dict[str, Any]:
  """Top-level `name = value` assignments of an mmcv config text, as plain Python values.

  Assignments using anything beyond literals, `dict(...)`, earlier names, arithmetic on numbers
  and `len`/`min`/... of those (`range(...)`, attribute access, `__import__`, ...) are left out,
  never evaluated.
  """
  try:
    tree = ast.parse(text)
  except SyntaxError as e:
    raise UserError(f"meta['config'] is not valid Python config text: {e}") from e
  names: Dict[str, Any] = {}
  for stmt in tree.body:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(
        stmt.targets[0], ast.Name):
      try:
        names[stmt.targets[0].id] = _literal(stmt.value, names)
      except _Unsupported:
        pass
  return names


def _pair(value: Any, what: str) -> Tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return (int(value[0]), int(value[1]))
  raise UserError(f'{what} = {value!r} is neither an int nor an (h, w) pair.')


def _model_name(model: Any) -> str:
  if not isinstance(model, Mapping) or 'backbone' not in model or 'decode_head' not in model:
    raise UserError("meta['config'] has no model = dict(backbone=..., decode_head=...).")
  kinds = (dict(model['backbone']).get('type'), dict(model['decode_head']).get('type'))
  if None in kinds:
    raise UserError("meta['config'] does not name the backbone and head types (not a merged "
                    'mmcv config?); pass --config=configs/X.py.')
  if kinds == ('VisionTransformer', 'ATMHead'):
    return 'segvit'
  if kinds == ('vit_shrink', 'TPNATMHead'):
    return 'segvit_shrunk'
  raise UserError(f'The checkpoint is a {kinds[0]} + {kinds[1]} model; segvit_jax converts '
                  'SegViT only: VisionTransformer + ATMHead or vit_shrink + TPNATMHead.')


def _check_supported(backbone: Mapping[str, Any], head: Mapping[str, Any], name: str) -> None:
  """Raises UserError listing every setting the JAX model does not implement."""
  problems = []
  def require(ok, message):
    if not ok:
      problems.append(message)

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
  embed_dims = int(backbone.get('embed_dims', 768))
  require(int(head.get('in_channels', embed_dims)) == embed_dims,
          'decode_head.in_channels must equal backbone.embed_dims')
  if name == 'segvit_shrunk':
    require(int(head.get('shrink_ratio', 16)) == int(backbone.get('patch_size', 16)),
            'decode_head.shrink_ratio must equal the patch size')
  require('num_classes' in head, 'decode_head.num_classes is not set')
  if problems:
    raise UserError('Unsupported SegViT config in the checkpoint: ' + '; '.join(problems) + '.')


def _set_model(m: ml_collections.ConfigDict, backbone: Mapping[str, Any],
               head: Mapping[str, Any], name: str) -> None:
  depth = int(backbone.get('num_layers', 12))
  out_indices = backbone.get('out_indices', -1)
  out_indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
  out_indices = [i + depth if i < 0 else i for i in out_indices]
  use_stages = int(head.get('use_stages', 3))
  m.name = name
  m.img_size = _pair(backbone.get('img_size', 224), 'backbone.img_size')
  m.patch_size = int(backbone.get('patch_size', 16))
  m.embed_dim = int(backbone.get('embed_dims', 768))
  m.depth = depth
  m.num_heads = int(backbone.get('num_heads', 12))
  m.mlp_ratio = int(backbone.get('mlp_ratio', 4))
  m.drop_path_rate = float(backbone.get('drop_path_rate', 0.0))
  # Both the official and the JAX heads read the FIRST use_stages taps: later taps are unused.
  m.out_indices = tuple(out_indices[:use_stages])
  m.use_stages = use_stages
  m.shrink_index = int(backbone.get('shrink_idx', 8)) if name == 'segvit_shrunk' else -1
  m.decoder_dim = int(head.get('embed_dims', 768))
  m.decoder_heads = int(head.get('num_heads', 8))
  m.decoder_layers = int(head.get('num_layers', 3))
  m.num_classes = int(head['num_classes'])


def _set_dataset(config: ml_collections.ConfigDict, cfg: Mapping[str, Any]) -> None:
  dataset_type = cfg.get('dataset_type') or dict(dict(cfg.get('data') or {}).get(
      'train') or {}).get('type')
  # The dataset that declares the official type (segvit_jax.data.datasets) applies its recipe.
  declared = datasets.by_mmseg_type(dataset_type)
  if declared is not None:
    dataset, num_classes = declared
    dataset.apply_recipe(config, num_classes)
  norm = cfg.get('img_norm_cfg')
  if isinstance(norm, Mapping) and 'mean' in norm and 'std' in norm:
    config.dataset.mean = tuple(float(x) for x in norm['mean'])
    config.dataset.std = tuple(float(x) for x in norm['std'])
    if not norm.get('to_rgb', True):
      logging.warning('img_norm_cfg.to_rgb is False: the checkpoint was trained on BGR input, '
                      'segvit_jax feeds RGB.')


def _set_loss_and_eval(config: ml_collections.ConfigDict, model: Mapping[str, Any],
                       head: Mapping[str, Any]) -> None:
  loss = dict(head.get('loss_decode') or {})
  if loss.get('type') == 'ATMLoss':
    scale = float(loss.get('loss_weight', 1.0))
    config.loss.cls_weight = scale * float(loss.get('cls_weight', 1.0))
    config.loss.mask_weight = scale * float(loss.get('mask_weight', 20.0))
    config.loss.dice_weight = scale * float(loss.get('dice_weight', 1.0))
  test_cfg = dict(model.get('test_cfg') or {})
  if test_cfg.get('mode') in ('slide', 'whole'):
    config.eval.mode = test_cfg['mode']
  if 'crop_size' in test_cfg:
    config.eval.crop_size = _pair(test_cfg['crop_size'], 'test_cfg.crop_size')
  if 'stride' in test_cfg:
    config.eval.stride = _pair(test_cfg['stride'], 'test_cfg.stride')


def _set_schedule(config: ml_collections.ConfigDict, cfg: Mapping[str, Any]) -> None:
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


def to_config(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A segvit_jax config for the model and recipe of a parsed mmcv SegViT config."""
  model = cfg.get('model')
  name = _model_name(model)
  backbone, head = dict(model['backbone']), dict(model['decode_head'])
  _check_supported(backbone, head, name)
  config = config_lib.get_base_config()
  _set_dataset(config, cfg)
  _set_model(config.model, backbone, head, name)
  config.dataset.num_classes = config.model.num_classes
  _set_loss_and_eval(config, model, head)
  _set_schedule(config, cfg)
  return config
