"""The two kinds of checkpoint, one `config.json` format, and the one loader of parameters.

Training checkpoints: `WORKDIR/checkpoints/<step>/` (Orbax `CheckpointManager`, one item: the whole
train state), written by `Checkpointer` asynchronously, the last N steps plus the best by mIoU.
Every host calls `save` / `restore`; Orbax writes each host's shards and finalises the step
directory atomically, so a run killed mid-save leaves the previous steps intact.

Exported parameter directories (`python -m segvit_jax.convert` writes them; `export_params`):

  DIR/params/      the params tree {'backbone': ..., 'head': ...} (Orbax PyTree checkpoint)
  DIR/config.json  the full config they belong to (`write_config`)
  DIR/config.py    `get_config()` reading that config.json, for `main --config=DIR/config.py`
  DIR/meta.json    where they come from (source file, class names, ignored tensors)

`load_params(path, abstract_params)` reads the params of either kind; the optimizer state of a
training checkpoint is never read. Restoring takes abstract leaves (`jax.ShapeDtypeStruct`);
when they carry shardings the arrays are laid out as those say (any mesh, any device count),
otherwise they come back as numpy arrays on the host.

`config.json` is nested JSON of `config.to_dict()` in both kinds, written by `write_config` and
read by `read_config` (JSON lists come back as tuples, as `config_base` writes sequences).
"""

import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from segvit_jax import config_base
from segvit_jax import fileio
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

PyTree = Any

BEST_METRIC = 'eval/miou'
PARAMS_DIR = 'params'
CONFIG_JSON = 'config.json'
_ITEM = 'default'  # the CheckpointManager's name for its single item
_SHOWN = 6  # differences listed in a mismatch message
# Orbax writes a replicated array in slices, one per replica, cutting each slice with an eager
# `lax.slice` on device: one small program compiled per leaf shape and sharding on the first save
# (measured: 6.2 s against 0.5 s for the first save of the tiny synthetic model on 8 CPU devices).
# Splitting pays only for big leaves (ViT-L's stacked MLP kernels are 400 MB); smaller ones are
# written whole by one replica.
_MIN_REPLICA_SLICE_BYTES = 8 << 20

_CONFIG_PY = '''"""The config of the parameters in this directory: --config=THIS_DIR/config.py."""

import os

from segvit_jax import checkpoint


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  return checkpoint.read_config(os.path.join(here, 'config.json'))
'''


# ------------------------------------------------------------------------------------------------
# config.json and config files.


def write_config(path: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` as nested JSON (tuples become lists)."""
  with fileio.open_file(path, 'w') as f:
    f.write(json.dumps(config.to_dict(), indent=2) + '\n')


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

  Keys the file lacks (added to segvit_jax after it was written) take `config_base`'s defaults.
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
  return ml_collections.ConfigDict(_merge(config_base.get_base_config().to_dict(), _tuples(data)))


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
  spec = importlib.util.spec_from_file_location('_segvit_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise UserError(f'--config={path} defines no get_config().')
  return module.get_config()


def _saved_config_or_none(path: str) -> Optional[ml_collections.ConfigDict]:
  """The config at `path` if there is one in the current layout (for messages only)."""
  if not fileio.exists(path):
    return None
  try:
    return read_config(path)
  except UserError:
    return None


# ------------------------------------------------------------------------------------------------
# Training checkpoints.


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(fileio.absolute(workdir), 'checkpoints')


def _best_metric(metrics: Mapping[str, Any]) -> float:
  return float(metrics[BEST_METRIC])


def _write_small_arrays_whole() -> None:
  """Orbax's handler of `jax.Array` leaves, with replica-parallel writes for big leaves only.

  Orbax's handlers live in one process-wide registry; this replaces its default `jax.Array`
  handler by the same handler with `_MIN_REPLICA_SLICE_BYTES` (the registry's own `add`: the
  public `register_type_handler` logs a warning). Called once, below: every save of this module
  (training checkpoints and exported parameters) goes through it.
  """
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint._src.serialization import type_handler_registry
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
      override=True, ignore_warnings=True)


_write_small_arrays_whole()


class Checkpointer:
  """Saves and restores train states under `directory` (WORKDIR/checkpoints).

  Keeps the `keep` most recent steps plus the one with the highest `eval/miou` among the steps
  saved with metrics (`save(..., metrics={'eval/miou': ...})`).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise UserError(f'config.keep_checkpoints must be at least 1, got {keep}.')
    self.directory = fileio.absolute(directory)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(
            get_metric_fn=_best_metric, reverse=False, n=1,
            keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=async_save,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    self._read_only = read_only
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, metrics: Optional[Mapping[str, float]] = None) -> None:
    """Starts an (asynchronous) save of `state` at `step`; returns before the write finishes."""
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    if self._read_only:
      raise ValueError(f'{self.directory} was opened read-only.')
    saved = self._manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics,
                               force=True)
    if saved:
      logging.info('Saving checkpoint at step %d to %s.', step, self.directory)

  def restore(self, step: int, abstract_state: PyTree,
              config: Optional[ml_collections.ConfigDict] = None) -> PyTree:
    """The state at `step`, laid out as `abstract_state`'s shardings say.

    Raises UserError when the saved state does not fit `abstract_state`, naming the keys in
    which `config` (the current one) differs from the workdir's config.json.
    """
    item = os.path.join(self.directory, str(int(step)), _ITEM)
    workdir = (os.path.dirname(self.directory) if os.path.basename(self.directory) ==
               'checkpoints' else self.directory)
    saved = _saved_tree(item)
    per_layer = _per_layer(saved.get('params', {}), config)
    target = segvit.unstack_params(abstract_state, config.model) if per_layer else abstract_state
    _check_fits(saved, target, label=workdir, kind='resume',
                saved_config=_saved_config_or_none(os.path.join(workdir, CONFIG_JSON)),
                config=config, sections=('model', 'optim'))
    restored = self._manager.restore(int(step), args=ocp.args.StandardRestore(target))
    return segvit.stack_params(restored, config.model) if per_layer else restored

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree`'s leaves with the given shardings (the restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _has_step_dirs(path: str) -> bool:
  return any(name.isdigit() and fileio.isdir(os.path.join(path, name))
             for name in fileio.listdir(path))


def training_checkpoint_root(path: str) -> Optional[str]:
  """The folder of numbered step folders: `path` itself or `path/checkpoints`; None if neither."""
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if _has_step_dirs(candidate):
      return candidate
  return None


# ------------------------------------------------------------------------------------------------
# Exported parameter directories.


def is_exported(path: str) -> bool:
  return all(fileio.exists(os.path.join(path, n)) for n in (PARAMS_DIR, CONFIG_JSON))


def _make_readable(root: str) -> None:
  """Directories 0755 and files 0644, whatever the umask: shared storage, other users."""
  os.chmod(root, 0o755)
  for parent, dirs, files in os.walk(root):
    for name in dirs:
      os.chmod(os.path.join(parent, name), 0o755)
    for name in files:
      os.chmod(os.path.join(parent, name), 0o644)


def check_new_directory(directory: str) -> None:
  """Raises UserError unless `directory` is absent or an empty directory (nothing to lose)."""
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise UserError(f'{directory} already exists and is not an empty directory; remove it or '
                    'choose another destination.')


def export_params(directory: str, params: PyTree, config: ml_collections.ConfigDict,
                  meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes an exported directory (a local path) atomically: a sibling temporary directory is
  filled, then renamed; nothing is left behind when anything fails or is interrupted."""
  if fileio.is_url(directory):
    raise UserError(f'{directory}: exported directories are written to local paths; write it '
                    'locally and copy it.')
  check_new_directory(directory)
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + '.partial-', dir=parent)
  except OSError as e:
    raise UserError(f'{directory}: cannot create it ({e.strerror}); choose a destination you '
                    'can write to.') from e
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
    write_config(os.path.join(tmp, CONFIG_JSON), config)
    with open(os.path.join(tmp, 'config.py'), 'w', encoding='utf-8') as f:
      f.write(_CONFIG_PY)
    with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(meta or {}), f, indent=2)
    _make_readable(tmp)
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ------------------------------------------------------------------------------------------------
# Loading parameters (either kind).


def _locate(path: str, flag: Optional[str]) -> tuple[str, str, str]:
  """(kind 'exported' | 'training', the params' item directory, the config.json path)."""
  label = f'{flag}={path}' if flag else path
  path = fileio.absolute(path)  # Orbax takes absolute paths only
  expected = ('expected a directory written by `python -m segvit_jax.convert` or a training '
              'workdir')
  if not fileio.exists(path):
    raise UserError(f'{label}: no such file or directory; {expected}.')
  if not fileio.isdir(path):
    if path.endswith(('.pth', '.pt')):
      raise UserError(f'{label} is an official PyTorch checkpoint: convert it first: '
                      f'python -m segvit_jax.convert {path} DIR')
    raise UserError(f'{label} is a file, not a checkpoint directory; {expected}.')
  if is_exported(path):
    return 'exported', os.path.join(path, PARAMS_DIR), os.path.join(path, CONFIG_JSON)
  root = training_checkpoint_root(path)
  if root is None:
    if fileio.isdir(os.path.join(path, 'checkpoints')):
      raise UserError(f'{label} has no finished checkpoint yet (checkpoints/ holds no step).')
    raise UserError(f'{label} is neither a directory written by segvit_jax.convert (params/ and '
                    'config.json) nor a training workdir (checkpoints/<step>/).')
  steps = ocp.path.step.checkpoint_steps(root)
  if not steps:
    raise UserError(f'{label} has no finished checkpoint step in {root}.')
  config_path = os.path.join(os.path.dirname(fileio.absolute(root)), CONFIG_JSON)
  return 'training', os.path.join(root, str(max(steps)), _ITEM), config_path


def saved_config(path: str, flag: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config.json stored with an exported directory or a training workdir.

  Raises UserError when there is none (or only the flat layout of older versions), saying to
  pass --config; `flag` names the command-line flag `path` came from, for the messages.
  """
  _, _, config_path = _locate(path, flag)
  if not fileio.exists(config_path):
    label = f'{flag}={path}' if flag else path
    raise UserError(f'{label} has no config.json: pass --config=configs/<name>.py (the config it '
                    'was trained with).')
  return read_config(config_path)


def params_step(path: str) -> int:
  """The training step of the params `load_params(path, ...)` loads: the latest finished step of
  a workdir, 0 for an exported directory."""
  kind, item, _ = _locate(path, None)
  return int(os.path.basename(os.path.dirname(item))) if kind == 'training' else 0


def load_params(path: str, abstract_params: PyTree, *,
                config: Optional[ml_collections.ConfigDict] = None,
                flag: Optional[str] = None) -> tuple[PyTree, Optional[ml_collections.ConfigDict]]:
  """(params, saved config) of an exported directory or a training workdir (latest step).

  Args:
    path: an exported directory, a training workdir, or its checkpoints/ folder.
    abstract_params: the params tree as `jax.ShapeDtypeStruct`s (unboxed). With shardings on
      every leaf the arrays are restored into them (on every host); without, as numpy arrays.
    config: the config `abstract_params` were built from: a mismatch is then reported as the
      config keys in which it differs from the saved config.json.
    flag: the flag or config key `path` came from ('config.init_checkpoint'), for messages.

  Returns the params and the config stored with them (None when there is none in the current
  layout). Raises UserError for a path that is not a checkpoint or does not fit.
  """
  kind, item, config_path = _locate(path, flag)
  saved = _saved_config_or_none(config_path)
  tree = _saved_tree(item)
  if kind == 'training':
    tree = tree.get('params', {})
  per_layer = _per_layer(tree, config)
  if per_layer:
    abstract_params = segvit.unstack_params(abstract_params, config.model)
  _check_fits(tree, abstract_params, label=f'{flag}={path}' if flag else path, kind=kind,
              saved_config=saved, config=config, sections=('model',))
  shardings = [getattr(x, 'sharding', None) for x in jax.tree.leaves(abstract_params)]
  if all(s is not None for s in shardings):
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  elif any(s is not None for s in shardings):
    raise ValueError('abstract_params: either every leaf carries a sharding or none does.')
  else:
    restore_args = jax.tree.map(
        lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), abstract_params)
  wrap = (lambda t: {'params': t}) if kind == 'training' else (lambda t: t)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item=wrap(abstract_params), restore_args=wrap(restore_args),
        partial_restore=kind == 'training'))
  logging.info('Loaded the params of %s.', item)
  params = restored['params'] if kind == 'training' else restored
  return (segvit.stack_params(params, config.model) if per_layer else params), saved


def _per_layer(saved_params: Mapping[str, Any],
               config: Optional[ml_collections.ConfigDict]) -> bool:
  """Whether saved params name one 'block_{i}' / 'layer_{l}' per layer (checkpoints and exported
  directories written before the blocks and decoder layers were scanned): they are restored
  into the per-layer layout and stacked."""
  return config is not None and segvit.has_unstacked_layout(saved_params, config.model)


# ------------------------------------------------------------------------------------------------
# Saved trees against the trees a config builds.


def _saved_tree(item: str) -> dict:
  """The saved tree of an Orbax PyTree item, leaves as Orbax metadata (with .shape)."""
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item)).tree


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape of every leaf, keyed as Orbax stores the tree."""
  return {'/'.join(k): tuple(getattr(v, 'shape', ())) for k, v in
          ocp.tree.to_flat_dict(tree).items()}


def _flat_section(config: ml_collections.ConfigDict, section: str) -> dict[str, Any]:
  out = {}

  def visit(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f'{prefix}.{k}', v)
    else:
      out[prefix] = tuple(value) if isinstance(value, list) else value

  visit(section, config.to_dict().get(section, {}))
  return out


_ABSENT = object()


def _fmt(value: Any) -> str:
  return 'absent' if value is _ABSENT else str(value)


def config_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                       sections: Sequence[str] = ('model',)) -> list[str]:
  """'model.embed_dim 768 (checkpoint) vs 1024 (config)' for each key of `sections` that differs."""
  out = []
  for section in sections:
    a, b = _flat_section(saved, section), _flat_section(current, section)
    for key in list(b) + [k for k in a if k not in b]:
      x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
      if x != y:
        out.append(f'{key} {_fmt(x)} (checkpoint) vs {_fmt(y)} (config)')
  return out


def _listed(items: Sequence[str]) -> str:
  more = f', and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
  return ', '.join(items[:_SHOWN]) + more


def _tree_differences(saved: PyTree, wanted: PyTree) -> list[str]:
  """The parameter paths missing from / unexpected in `saved`, and those of another shape."""
  have, want = _shapes(saved), _shapes(wanted)
  missing = [k for k in want if k not in have]
  unexpected = [k for k in have if k not in want]
  shapes = [f'{k} {have[k]} (checkpoint) vs {want[k]} (config)' for k in want
            if k in have and have[k] != want[k]]
  parts = []
  for title, items in (('missing', missing), ('unexpected', unexpected),
                        ('of another shape', shapes)):
    if items:
      parts.append(f'{len(items)} {title}: {_listed(items)}')
  return parts


_FIXES = {
    'resume': 'use the config it was trained with, or another --workdir to start afresh',
    'training': 'use the config it was trained with',
    'exported': 'use its own config.json or a configs/*.py file of the same model',
}


def _check_fits(saved: PyTree, wanted: PyTree, *, label: str, kind: str,
                saved_config: Optional[ml_collections.ConfigDict],
                config: Optional[ml_collections.ConfigDict], sections: Sequence[str]) -> None:
  """Raises UserError (one line) unless `saved` holds exactly the leaves and shapes of `wanted`."""
  tree = _tree_differences(saved, wanted)
  if not tree:
    return
  keys = (config_differences(saved_config, config, sections)
          if saved_config is not None and config is not None else [])
  if keys:
    what = 'was trained with' if kind != 'exported' else 'holds the parameters of'
    raise UserError(f'{label} {what} a different config: {_listed(keys)}; {_FIXES[kind]}.')
  raise UserError(f'{label} does not fit the model of the config: {"; ".join(tree)}; '
                  f'{_FIXES[kind]}.')
