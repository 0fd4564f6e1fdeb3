"""The keys every config has, with the official recipe's defaults
(official `configs/_base_/models/seg_vit-b16.py` and `configs/segvit/segvit_vit-l_jax_*.py`),
and configs on disk: `config.json`, `configs/*.py` (`load_config`).

The files in `configs/` start from `get_base_config()` and change what their paper setting changes.
Users override any key from the command line: `--config.batch_size=8 --config.mesh=data:4,model:2`.

`config.json` (in a training workdir and beside exported parameters) is nested JSON of
`config.to_dict()`, written by `write_config` and read by `read_config`: JSON lists come back as
tuples, as the defaults here write sequences, and keys the file lacks take the defaults.
"""

import importlib.util
import json
import os
from typing import Any, Mapping, Optional

import ml_collections

from segvit_jax import fileio
from segvit_jax.errors import UserError


def vit_base(model: ml_collections.ConfigDict) -> None:
  """ViT-B/16 as in the official `seg_vit-b16.py` (ATM head d = 384, 12 heads)."""
  model.embed_dim = 768
  model.depth = 12
  model.num_heads = 12
  model.out_indices = (5, 7, 11)
  model.drop_path_rate = 0.1
  model.decoder_dim = 384
  model.decoder_heads = 12


def vit_large(model: ml_collections.ConfigDict) -> None:
  """ViT-L/16 as in the official ViT-L configs (ATM head d = 512, 16 heads)."""
  model.embed_dim = 1024
  model.depth = 24
  model.num_heads = 16
  model.out_indices = (7, 15, 23)
  model.drop_path_rate = 0.3
  model.decoder_dim = 512
  model.decoder_heads = 16


def shrunk(model: ml_collections.ConfigDict) -> None:
  """The Shrunk variant: QD at block 8 of ViT-L, QU head + single-stage ATM (official
  `backbone/vit_shrink.py`, `decode_heads/tpn_atm_head.py`)."""
  model.name = 'segvit_shrunk'
  model.shrink_index = 8
  model.out_indices = (7, 23)
  model.use_stages = 2


def _model_defaults() -> ml_collections.ConfigDict:
  """config.model: ViT-L/16 + the ATM head."""
  m = ml_collections.ConfigDict()
  m.name = 'segvit'  # 'segvit' (ViT + ATM head) or 'segvit_shrunk' (QD in the ViT, QU + ATM head)
  m.img_size = (640, 640)  # the crop (h, w) the position-embedding grid is stored for
  m.patch_size = 16
  m.mlp_ratio = 4
  m.shrink_index = -1  # block that performs query-based down-sampling (shrunk only)
  m.use_stages = 3  # backbone taps used by the head
  m.decoder_layers = 3
  m.decoder_dropout = 0.1
  m.num_classes = 150
  m.dtype = 'float32'  # compute dtype; parameters stay float32. 'bfloat16' for mixed precision.
  m.remat = 'none'  # backbone blocks in the backward pass: 'none', 'full' (recompute) or 'dots'
  # softmax(q k^T) v: 'auto' (Pallas on TPU, cuDNN on GPU in bf16, per-head on CPU), 'xla',
  # 'per_head', 'pallas_tpu' or 'cudnn'.
  m.attention = 'auto'
  m.scan_unroll = 1  # backbone blocks per iteration of each scanned segment
  vit_large(m)
  return m


def _dataset_defaults() -> ml_collections.ConfigDict:
  """config.dataset: ADE20K with mmseg's train and test pipelines."""
  d = ml_collections.ConfigDict()
  d.name = 'ade20k'  # a declared dataset (segvit_jax.data.datasets): class names, palette
  d.source = 'tfds'  # 'tfds', 'mmseg_folder' (an mmseg-prepared folder) or an in-memory dataset
  d.tfds_name = 'ade20k'  # builder name, with config: 'pascal_context/60'
  d.data_dir = ''  # TFDS data dir; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.folder = ''  # root of an mmseg folder: img_dir/{train,val}, ann_dir/{train,val}
  d.reduce_zero_label = True  # label 0 -> 255, k -> k - 1 (ADE20K, COCO-Stuff)
  d.num_classes = 150
  d.crop_size = (640, 640)
  d.img_scale = (2048, 640)  # (long, short) side bounds before the ratio
  d.ratio_range = (0.5, 2.0)
  d.cat_max_ratio = 0.75
  d.flip_prob = 0.5
  d.photometric = True
  d.mean = (127.5, 127.5, 127.5)  # RGB
  d.std = (127.5, 127.5, 127.5)
  d.test_img_scale = (2048, 640)  # test resize: long side <= 2048, short side <= 640, aspect kept
  d.test_min_size = 0  # > 0: the short side is at least this (COCO 512, PC 480)
  d.eval_bucket = 64  # resized eval images are padded up to a multiple of this on each side
  d.eval_pad_size = (2048, 2048)  # static (h, w) bucket of test-resized eval images
  d.eval_label_pad_size = (2048, 2048)  # static (h, w) bucket of original-size eval labels
  d.shuffle_buffer = 1000
  d.prefetch = 2
  d.synthetic_image_size = 96  # source 'synthetic': square image side (or (h, w))
  d.synthetic_num_train = 1000  # source 'synthetic': examples per split, rendered in memory
  d.synthetic_num_val = 100
  d.synthetic_seed = 0  # source 'synthetic': example i of a split depends on (seed, split, i)
  return d


def get_base_config() -> ml_collections.ConfigDict:
  """ViT-L SegViT on ADE20K at 640x640, the official recipe. Configs change what differs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 16  # global, over all hosts and devices
  config.num_train_steps = 160_000
  config.log_every_steps = 50
  config.checkpoint_every_steps = 16_000
  config.keep_checkpoints = 3  # the last N; the best by mIoU is kept as well
  # axis:size pairs over data / fsdp / model; -1 takes the remaining devices
  config.mesh = 'data:-1'
  config.init_checkpoint = ''  # a directory written by `segvit_jax.convert` (or a training workdir)
  # The step of the training workdir read by --mode=eval (config.init_checkpoint or WORKDIR) and
  # by fine-tuning from config.init_checkpoint; 0: its latest.
  config.restore_step = 0
  config.pretrained_backbone = ''  # AugReg ViT `.npz` or mmseg `vit_*_p16_384*.pth`, for training

  config.model = _model_defaults()

  config.loss = ml_collections.ConfigDict()
  config.loss.no_object_weight = 0.1
  config.loss.cls_weight = 1.0
  config.loss.mask_weight = 20.0  # sigmoid focal, alpha 0.25, gamma 2
  config.loss.dice_weight = 1.0

  config.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 2e-5
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = 0.01
  o.head_lr_mult = 10.0
  o.warmup_steps = 1500
  o.warmup_ratio = 1e-6
  o.poly_power = 1.0
  o.min_lr = 0.0
  o.grad_clip_norm = 35.0
  o.grad_accum_steps = 1

  config.dataset = _dataset_defaults()

  # What the run evaluates (segvit_jax.evaluation.evaluators): every_steps N > 0 after every N-th step and
  # the last; -1 after the last step only; 0 never. Metrics are named '<entry>/<metric>'.
  config.evals = ml_collections.ConfigDict()
  config.evals.val = dict(type='miou', every_steps=4000)  # mIoU & co.; picks the best checkpoint
  config.evals.figure = dict(type='figure', every_steps=-1, num_images=4)  # predictions.png

  # How a model is evaluated: test resize, windows, TTA (mmseg's test_cfg and test pipeline).
  config.eval = e = ml_collections.ConfigDict()
  e.mode = 'slide'  # 'slide' or 'whole'
  e.crop_size = (640, 640)
  e.stride = (608, 608)
  e.batch_size = 8  # global
  e.multi_scale = False
  e.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  e.flip = True  # with multi_scale
  e.num_examples = -1  # -1: the whole split
  return config


# ------------------------------------------------------------------------------------------------
# Configs on disk.

CONFIG_JSON = 'config.json'

# The config.py written beside exported parameters, for `--config=DIR/config.py`. Directories
# written before config I/O moved here hold the same text importing `segvit_jax.checkpoint`,
# which no longer has `read_config`: `load_config` recognises both texts and reads the
# config.json beside them instead of running them.
_CONFIG_PY_TEMPLATE = '''\
"""The config of the parameters in this directory: --config=THIS_DIR/config.py."""

import os

{import_line}


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  return {reader}.read_config(os.path.join(here, 'config.json'))
'''
_CONFIG_PY = _CONFIG_PY_TEMPLATE.format(
    import_line='from segvit_jax import config as config_lib', reader='config_lib')
_CONFIG_PY_TEXTS = (_CONFIG_PY, _CONFIG_PY_TEMPLATE.format(
    import_line='from segvit_jax import checkpoint', reader='checkpoint'))


def write_config(path: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` as nested JSON (tuples become lists), whole or not at all."""
  fileio.replace_file(path, json.dumps(config.to_dict(), indent=2) + '\n')


def _tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _merge(base: dict, saved: Mapping[str, Any]) -> dict:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = value
  return base


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config `write_config` wrote to `path`.

  Keys the file lacks (added to segvit_jax after it was written) take `get_base_config()`'s values.
  Raises UserError for a file that is not such a config, e.g. the flat layout of older versions.
  """
  try:
    with fileio.open_file(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e}): expected a config.json written by '
                    'segvit_jax.') from e
  if not isinstance(data, dict):
    raise UserError(f'{path} holds a JSON {type(data).__name__}, not a segvit_jax config.')
  dotted = [k for k in data if '.' in k]
  if dotted:
    raise UserError(
        f'{path} is in the flat layout of older segvit_jax versions (dotted keys such as '
        f'{dotted[0]!r}), which is no longer read: pass --config=<the configs/*.py file the run '
        'was trained with, with the same --config.* overrides>.')
  return ml_collections.ConfigDict(_merge(get_base_config().to_dict(), _tuples(data)))


def read_config_or_none(path: str) -> Optional[ml_collections.ConfigDict]:
  """The config at `path` if there is one in the current layout, else None (for messages)."""
  if not fileio.exists(path):
    return None
  try:
    return read_config(path)
  except UserError:
    return None


def _written_beside_json(path: str) -> Optional[str]:
  """The config.json beside `path` when `path` is a config.py that `write_config_py` wrote (in
  this version or before config I/O moved here); else None."""
  beside = os.path.join(os.path.dirname(path), CONFIG_JSON)
  if os.path.basename(path) != 'config.py' or not fileio.exists(beside):
    return None
  with fileio.open_file(path) as f:
    text = f.read()
  return beside if text in _CONFIG_PY_TEXTS else None


def write_config_py(directory: str) -> None:
  """Writes `directory`/config.py: `get_config()` reading the config.json beside it."""
  with open(os.path.join(directory, 'config.py'), 'w', encoding='utf-8') as f:
    f.write(_CONFIG_PY)


def load_config(path: str) -> ml_collections.ConfigDict:
  """A config from a `configs/*.py` file (its `get_config()`), a config.json, or a directory
  holding a config.json (an exported directory or a training workdir)."""
  if not fileio.exists(path):
    raise UserError(f'--config={path}: no such file; expected a configs/*.py file or a '
                    'config.json.')
  if fileio.isdir(path):
    if not fileio.exists(os.path.join(path, CONFIG_JSON)):
      raise UserError(f'--config={path} is a directory without a config.json; expected a '
                      'configs/*.py file, a config.json or a directory holding one.')
    return read_config(os.path.join(path, CONFIG_JSON))
  if path.endswith('.json'):
    return read_config(path)
  if not path.endswith('.py'):
    raise UserError(f'--config={path}: expected a configs/*.py file or a config.json.')
  beside = _written_beside_json(path)
  if beside is not None:
    return read_config(beside)
  spec = importlib.util.spec_from_file_location('_segvit_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise UserError(f'--config={path} defines no get_config().')
  return module.get_config()
