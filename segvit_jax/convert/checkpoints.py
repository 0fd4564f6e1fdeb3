r"""Official SegViT checkpoints (mmseg/mmcv `.pth`) -> exported segvit_jax parameter directories.

    python -m segvit_jax.convert ade_51.3.pth /tmp/ade_vitb [--config=configs/ade20k_base.py]
    python -m segvit_jax.convert hf://Akide/SegViTv1/ade_51.3.pth /tmp/ade_vitb

`hf://OWNER/REPO/FILE` is a file of a Hugging Face model repository (the official weights are in
`Akide/SegViTv1`), fetched into huggingface_hub's cache (HF_HOME / HF_HUB_CACHE; offline with
HF_HUB_OFFLINE=1 it must be there already) and read from there.

writes the directory `segvit_jax.checkpoint.parameters.export_params` describes (params/,
config.json, config.py, meta.json with class names, palette, source file and the tensors
ignored), which `predict --checkpoint=DIR` and `--config.init_checkpoint=DIR` read.

Without `--config` the architecture comes from the checkpoint itself: `meta['config']` holds the
mmcv config as Python text, parsed without executing anything (`mmcv_config`) and cross-checked
against the tensor shapes. The conversion is strict: every tensor of the state dict maps to
exactly one parameter or is explicitly ignored, every parameter is filled, and all missing,
unexpected and mis-shaped keys are reported in one error. Nothing is written when anything is
wrong. The checkpoint is memory-mapped and only its state dict is read, one tensor at a time.

Python API:
    model, variables, config = load_torch_checkpoint('ade_51.3.pth')
    scores = model.apply(variables, images, train=False)      # (B, H, W, K)
"""

import math
import os
import re

from typing import Any, Mapping, Optional, Sequence

from absl import logging
import flax.linen as nn
import ml_collections

from segvit_jax import config as config_lib
from segvit_jax.checkpoint import parameters
from segvit_jax.convert import keymap
from segvit_jax.convert import mmcv_config
from segvit_jax.convert import torch_files
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

FORMAT = 'segvit_jax.convert/1'
HF_SCHEME = 'hf://'

# Tensors that have no counterpart in segvit_jax, on purpose (regular expressions).
IGNORED = (
    (r'decode_head\.(atm\.)?loss_decode\.criterion\.empty_weight',
     'ATM loss buffer (no-object weight -> config.loss.no_object_weight)'),
)


# ------------------------------------------------------------------------------------------------
# The key table of the heads (the backbone's is `keymap.vit_rules`).


def _atm_attention(src: str, dst: str):
  """SegViT's `Attention` (separate q, k, v, proj Linear) -> Attention(query, key, value, out)."""
  rules = []
  for a, b in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    rules += [(f'{src}.{a}.weight', f'{dst}/{b}/kernel', keymap.HEADS_KERNEL),
              (f'{src}.{a}.bias', f'{dst}/{b}/bias', keymap.HEADS_BIAS)]
  return rules + [(src + '.proj.weight', dst + '/out/kernel', keymap.OUT_KERNEL),
                  (src + '.proj.bias', dst + '/out/bias', keymap.COPY)]


def _decoder_layer(src: str, dst: str, standard_cross_attn: bool):
  """A `TPN_DecoderLayer` (decode_heads/atm_head.py); `standard_cross_attn`: the torch
  nn.MultiheadAttention cross-attention of the QU layers in decode_heads/tpn_atm_head.py."""
  rules = (keymap.torch_mha(src + '.self_attn', dst + '/self_attn')
           + keymap.linear(src + '.linear1', dst + '/linear1')
           + keymap.linear(src + '.linear2', dst + '/linear2'))
  for n in (1, 2, 3):
    rules += keymap.norm(f'{src}.norm{n}', f'{dst}/norm{n}')
  cross = keymap.torch_mha if standard_cross_attn else _atm_attention
  return rules + cross(src + '.multihead_attn', dst + '/cross_attn')


def head_rules(name: str):
  """ATMHead ('segvit') or TPNATMHead + ATMSingleHead ('segvit_shrunk') -> params['head']."""
  qu = name == 'segvit_shrunk'
  rules = (keymap.linear('decode_head.input_proj_{s}', 'head/input_proj_{s}')
           + keymap.norm('decode_head.proj_norm_{s}', 'head/proj_norm_{s}')
           + [('decode_head.q.weight', 'head/queries', keymap.COPY)]
           + _decoder_layer('decode_head.decoder_{s}.layers.{l}', 'head/decoder_{s}/layer_{l}',
                            standard_cross_attn=qu))
  if qu:  # the ATMSingleHead: no input_proj / proj_norm (Identity), its own queries
    rules += ([('decode_head.atm.q.weight', 'head/atm/queries', keymap.COPY)]
              + keymap.linear('decode_head.atm.class_embed', 'head/atm/class_embed')
              + _decoder_layer('decode_head.atm.decoder_1.layers.{l}',
                               'head/atm/decoder_1/layer_{l}', False))
  else:
    rules += keymap.linear('decode_head.class_embed', 'head/class_embed')
  return rules


# ------------------------------------------------------------------------------------------------
# Checks of the config against the tensors.


def _state_kind(state: Mapping[str, Any]) -> Optional[str]:
  if 'decode_head.atm.q.weight' in state:
    return 'segvit_shrunk'
  if 'decode_head.q.weight' in state and 'decode_head.class_embed.weight' in state:
    return 'segvit'
  return None


def _grid_problems(m: ml_collections.ConfigDict, state: Mapping[str, Any], kind: str):
  gh, gw = (s // m.patch_size for s in m.img_size)
  problems = []
  pos = tuple(state['backbone.pos_embed'].shape) if 'backbone.pos_embed' in state else None
  if pos and pos[1] != 1 + gh * gw:
    side = math.isqrt(pos[1] - 1)
    guess = (f' (a {side}x{side} grid: img_size {side * m.patch_size})'
             if side * side == pos[1] - 1 else '')
    problems.append(f'model.img_size {tuple(m.img_size)} needs a {gh}x{gw} position grid '
                    f'({1 + gh * gw} rows) but backbone.pos_embed is {keymap.fmt(pos)}{guess}')
  qu = tuple(state['decode_head.q.weight'].shape) if 'decode_head.q.weight' in state else None
  if kind == 'segvit_shrunk' and qu and qu[0] != gh * gw:
    problems.append(f'model.img_size {tuple(m.img_size)} needs {gh * gw} QU queries but '
                    f'decode_head.q.weight is {keymap.fmt(qu)}')
  return problems


def check_config_against_state(config: ml_collections.ConfigDict,
                               state: Mapping[str, Any], source: str) -> None:
  """Raises UserError listing every model setting the tensors contradict."""
  m = config.model
  kind = _state_kind(state)
  if kind is None:
    head = sorted(k for k in state if k.startswith('decode_head.'))[:3]
    raise UserError(
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
                    f'are {keymap.fmt(queries)}: {queries[0]} classes')
  if queries and queries[1] != m.decoder_dim:
    problems.append(f'model.decoder_dim is {m.decoder_dim} but the class queries have width '
                    f'{queries[1]}')
  patch = shape('backbone.patch_embed.projection.weight')
  if patch and patch[0] != m.embed_dim:
    problems.append(f'model.embed_dim is {m.embed_dim} but backbone.patch_embed.projection.weight '
                    f'is {keymap.fmt(patch)}')
  if patch and patch[2:] != (m.patch_size, m.patch_size):
    problems.append(f'model.patch_size is {m.patch_size} but the patch kernel is {patch[2:]}')
  blocks = {int(x.group(1)) for x in (re.match(r'backbone\.layers\.(\d+)\.', k) for k in state)
            if x}
  if blocks and max(blocks) + 1 != m.depth:
    problems.append(f'model.depth is {m.depth} but the checkpoint has {max(blocks) + 1} blocks')
  problems += _grid_problems(m, state, kind)
  if problems:
    raise UserError(f'The config does not match {source}: ' + '; '.join(problems) + '.')


# ------------------------------------------------------------------------------------------------
# Whole checkpoints.


def _no_object_weight(state, kind) -> Optional[float]:
  key = ('decode_head.atm.' if kind == 'segvit_shrunk' else 'decode_head.') + (
      'loss_decode.criterion.empty_weight')
  if key in state and tuple(state[key].shape) and state[key].shape[0] > 0:
    return float(torch_files.to_numpy(state[key])[-1])
  return None


def _json_safe(value):
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, 'tolist'):  # numpy arrays and scalars
    return _json_safe(value.tolist())
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)


def _config_for(path: str, meta: Mapping[str, Any], config) -> tuple:
  """(a copy of the config to convert with, where it comes from)."""
  if config is None:
    text = meta.get('config')
    if not isinstance(text, str):
      raise UserError(f"{path} has no meta['config'] text (a bare state dict?): pass "
                      '--config=configs/X.py to say which architecture it is.')
    return mmcv_config.to_config(mmcv_config.parse(text)), "the checkpoint's meta['config']"
  if isinstance(config, str):
    config = config_lib.load_config(config)
  return ml_collections.ConfigDict(config.to_dict()), 'the given config'


def _abstract_params(model_config: ml_collections.ConfigDict):
  """The model's params as ShapeDtypeStructs: what the key table maps the tensors onto."""
  return nn.unbox(segvit.abstract_params(segvit.build_model(model_config)))


def _meta(path: str, meta: Mapping[str, Any], origin: str, ignored, num_classes: int) -> dict:
  names = _json_safe(list(meta['CLASSES'])) if meta.get('CLASSES') is not None else None
  palette = _json_safe(meta['PALETTE']) if meta.get('PALETTE') is not None else None
  if names and len(names) != num_classes:
    logging.warning("meta['CLASSES'] names %d classes, the model has %d; names not kept.",
                    len(names), num_classes)
    names = palette = None
  return {
      'format': FORMAT, 'source': os.path.abspath(path), 'config_from': origin,
      'class_names': names, 'palette': palette, 'ignored': ignored,
      'mmcv_meta': {k: _json_safe(meta[k]) for k in ('mmseg_version', 'mmcv_version', 'iter',
                                                       'epoch', 'exp_name') if k in meta},
  }


def convert_checkpoint(path: str, config=None, allow_pickle: bool = False):
  """(params tree, config, meta dict) of an official checkpoint; raises UserError.

  `config`: None (read meta['config']), a full segvit_jax ConfigDict, or a config file path
  (configs/*.py or a config.json). The returned config has `config.convert.class_names` /
  `.palette` from the checkpoint's meta (empty when absent).
  """
  state, meta = torch_files.read_state_dict(path, allow_pickle)
  config, origin = _config_for(path, meta, config)
  check_config_against_state(config, state, path)
  try:
    segvit.check_model_config(config.model)
  except ValueError as e:
    raise UserError(f'{origin}: {e}') from e
  name = config.model.name
  # The key table names one block / decoder layer per official layer; the model stacks them.
  per_layer = segvit.unstack_params(_abstract_params(config.model), config.model)
  params, report = keymap.map_state_dict(
      state, per_layer, keymap.vit_rules() + head_rules(name), IGNORED)
  error = report.error()
  if error:
    raise UserError(f'{path} does not fit the model of {origin} ({name}): {error}')
  params = segvit.stack_params(params, config.model)
  eos = _no_object_weight(state, name)
  if eos is not None:
    config.loss.no_object_weight = eos
  info = _meta(path, meta, origin, report.ignored, config.model.num_classes)
  config.convert = ml_collections.ConfigDict({
      'source': info['source'],
      'class_names': tuple(info['class_names'] or ()),
      'palette': tuple(tuple(c) for c in (info['palette'] or ())),
  })
  # The converted params, in the model's layout.
  return params, config, info


def load_torch_checkpoint(path: str, config=None, allow_pickle: bool = False):
  """(model, variables, config) of an official SegViT `.pth`, converted in memory."""
  params, config, _ = convert_checkpoint(path, config, allow_pickle)
  return segvit.build_model(config.model), {'params': params}, config


# ------------------------------------------------------------------------------------------------
# Command line.


def resolve_source(src: str) -> str:
  """The local path of `src`: itself, or for hf://OWNER/REPO/FILE the file in huggingface_hub's
  cache (downloaded there first unless HF_HUB_OFFLINE is set). Raises UserError."""
  if not src.startswith(HF_SCHEME):
    return src
  parts = src[len(HF_SCHEME):].split('/')
  if len(parts) < 3 or not all(parts):
    raise UserError(f'{src}: expected hf://OWNER/REPO/FILE, e.g. '
                    'hf://Akide/SegViTv1/ade_51.3.pth.')
  repo_id, filename = '/'.join(parts[:2]), '/'.join(parts[2:])
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"{src} needs huggingface_hub, which is not installed: pip install "
                    "'segvit_jax[hf]' (or huggingface_hub).") from e
  try:
    return huggingface_hub.hf_hub_download(repo_id, filename)
  except hf_errors.LocalEntryNotFoundError as e:
    cache = huggingface_hub.constants.HF_HUB_CACHE
    raise UserError(f'{src} is not in the Hugging Face cache ({cache}) and cannot be downloaded '
                    'now (HF_HUB_OFFLINE=1, or no connection).') from e
  except (hf_errors.EntryNotFoundError, hf_errors.RepositoryNotFoundError,
          hf_errors.RevisionNotFoundError) as e:
    raise UserError(f'{src}: no such file in the Hugging Face repository {repo_id} '
                    f'({type(e).__name__}).') from e


def convert_to_dir(src: str, dst: str, config=None, allow_pickle: bool = False) -> str:
  """Converts `src` (a path or hf://OWNER/REPO/FILE) and writes `dst`; returns a one-line
  summary. Raises UserError."""
  parameters.check_new_directory(dst)
  params, config, info = convert_checkpoint(resolve_source(src), config, allow_pickle)
  parameters.export_params(dst, params, config, info)
  m = config.model
  backbone, head = segvit.param_counts(params)
  return (f'Converted {src} -> {dst}: {m.name}, ViT {m.embed_dim}x{m.depth}, img_size '
          f'{tuple(m.img_size)}, {m.num_classes} classes, {backbone + head:,} parameters '
          f'(backbone {backbone:,}, head {head:,}); config from {info["config_from"]}; '
          f'{len(info["ignored"])} tensors ignored.')


def main(argv: Sequence[str]) -> int:
  """CLI body: argv = [prog, SRC, DST_DIR]; prints the one-line summary."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) != 3:
    raise UserError('expected SRC.pth DST_DIR: python -m segvit_jax.convert SRC.pth DST_DIR '
                    '[--config=configs/X.py|DIR/config.json] [--allow_pickle]')
  print(convert_to_dir(argv[1], argv[2], flags.FLAGS.config, flags.FLAGS.allow_pickle))
  return 0


def run():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from segvit_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('config', None, 'segvit_jax config (configs/*.py or a config.json); '
                      "default: read meta['config'] of the checkpoint.")
  flags.DEFINE_bool('allow_pickle', False,
                    'Unpickle arbitrary objects in the checkpoint (only for files you trust).')
  cli.run(main)


if __name__ == '__main__':
  run()
