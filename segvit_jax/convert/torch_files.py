"""Reading PyTorch checkpoint files (`.pth`) safely, without the optimizer state.

A file is first recognised by its bytes: a `torch.save` zip archive is memory-mapped
(`torch.load(mmap=True)`: tensors stay on disk until touched, so the AdamW moments, two thirds of
an official release file, are never read); a legacy pickle is loaded whole. Both go through
torch's restricted unpickler (`weights_only=True`) unless `allow_pickle` is set. Anything else is
named for what it is, with what would work instead.

PyTorch is imported only here, and only when a `.pth` file is read.
"""

import os
import zipfile
from typing import Any, Dict, Mapping, Tuple

from absl import logging
import numpy as np

from segvit_jax.errors import UserError

_WANTED = 'convert reads the official mmseg .pth checkpoints (torch.save files)'
# Legacy (non-zip) torch.save files open with a pickled long: this magic number.
_LEGACY_MAGIC = b'\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError('Reading a PyTorch .pth file needs the CPU build of torch (pip install torch '
                    '--index-url https://download.pytorch.org/whl/cpu); AugReg .npz backbones '
                    'load without it.') from e
  return torch


def _zip_kind(path: str) -> str:
  """'torch' for a torch.save archive, else a description of the zip archive."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError):
    return (f'{path} ({os.path.getsize(path)} bytes) starts like a zip archive (the torch.save '
            'format) but is not a complete one: is the file truncated? Download it again.')
  if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
    return 'torch'
  if names and all(n.endswith('.npy') for n in names):
    return (f'{path} is a numpy .npz archive, not a PyTorch checkpoint (an AugReg ViT backbone '
            'goes to --config.pretrained_backbone when training); ' + _WANTED + '.')
  return (f'{path} is a zip archive but not a torch.save file (no data.pkl in it; first entries '
          f'{names[:3]}); ' + _WANTED + '.')


def file_kind(path: str) -> str:
  """'zip' (torch.save), 'pickle' (legacy torch.save), else raises UserError saying what it is."""
  if not os.path.exists(path):
    raise UserError(f'{path}: no such file.')
  if os.path.isdir(path):
    raise UserError(f'{path} is a directory, not a checkpoint file; {_WANTED}.')
  with open(path, 'rb') as f:
    head = f.read(16)
  if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
    kind = _zip_kind(path)
    if kind != 'torch':
      raise UserError(kind)
    return 'zip'
  if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 header
    if head[2:14] != _LEGACY_MAGIC:
      raise UserError(f'{path} is a Python pickle but not a torch.save file; {_WANTED}.')
    return 'pickle'
  if not head:
    raise UserError(f'{path} is empty (0 bytes); {_WANTED}.')
  raise UserError(f'{path} ({os.path.getsize(path)} bytes, starting {head[:8]!r}) is not a PyTorch '
                  f'checkpoint: neither a torch.save zip archive nor a pickle; {_WANTED}.')


def _unreadable(path: str, error: Exception, allow_pickle: bool) -> UserError:
  text = str(error).strip()
  first_line = text.splitlines()[0] if text else type(error).__name__
  if not allow_pickle and 'weights_only' in text:
    return UserError(f'{path} holds Python objects beyond tensors and plain containers, which '
                     'the safe loader refuses; if you trust the file, pass --allow_pickle.')
  return UserError(f'{path} ({os.path.getsize(path)} bytes) cannot be read as a PyTorch '
                   f'checkpoint ({first_line}): is the file complete (not truncated)?')


def read_torch_file(path: str, allow_pickle: bool = False) -> Any:
  """The object a `.pth` file holds; tensors memory-mapped when the file is a zip archive."""
  kind = file_kind(path)
  torch = _import_torch()
  if kind == 'pickle':
    logging.warning('%s is in the legacy torch format: loading it whole (no mmap).', path)
  try:
    return torch.load(path, map_location='cpu', weights_only=not allow_pickle,
                      mmap=kind == 'zip')
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, e, allow_pickle) from e


def split_checkpoint(obj: Any, path: str) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
  """(state_dict, meta) of an mmcv checkpoint dict or a bare state dict."""
  if not isinstance(obj, Mapping):
    raise UserError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict.')
  if 'state_dict' in obj:
    state, meta = obj['state_dict'], obj.get('meta') or {}
  elif 'model' in obj and isinstance(obj['model'], Mapping):
    state, meta = obj['model'], obj.get('meta') or {}
  else:
    state, meta = obj, {}
  if not isinstance(state, Mapping) or not state:
    raise UserError(f'{path}: the state dict is empty or not a dict.')
  bad = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if bad:
    raise UserError(f'{path}: state dict entries that are not tensors: {bad[:5]}.')
  if any(k.startswith('module.') for k in state):  # a DDP wrapper saved without mmcv
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
  return state, dict(meta) if isinstance(meta, Mapping) else {}


def read_state_dict(path: str,
                    allow_pickle: bool = False) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
  """(state_dict: key -> torch tensor, meta) of a `.pth` file."""
  return split_checkpoint(read_torch_file(path, allow_pickle), path)


def to_numpy(tensor: Any) -> np.ndarray:
  """A float32 numpy copy of one (possibly memory-mapped, possibly half) torch tensor."""
  if isinstance(tensor, np.ndarray):
    return np.asarray(tensor, np.float32)
  return np.array(tensor.detach().float().numpy(), dtype=np.float32, copy=True)
