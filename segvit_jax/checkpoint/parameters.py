"""Parameters on disk: exported parameter directories, and the one loader of parameters.

Exported parameter directories (`python -m segvit_jax.convert` writes them; `export_params`):

  DIR/params/      the params tree {'backbone': ..., 'head': ...} (Orbax PyTree checkpoint)
  DIR/config.json  the full config they belong to (`config_lib.write_config`)
  DIR/config.py    `get_config()` reading that config.json, for `main --config=DIR/config.py`
  DIR/meta.json    where they come from (source file, class names, ignored tensors)

`load_params(path, abstract_params)` reads the params of an exported directory or of a training
workdir (`WORKDIR/checkpoints/<step>/`, its latest step or a given one); the optimizer state of a
training checkpoint is never read. Restoring takes abstract leaves (`jax.ShapeDtypeStruct`):
when they carry shardings the arrays are laid out as those say (any mesh, any device count),
otherwise they come back as numpy arrays on the host. A damaged step is named with the earlier
step that loads.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, NamedTuple, Optional

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from segvit_jax import config as config_lib
from segvit_jax import fileio
from segvit_jax.checkpoint import compatibility
from segvit_jax.checkpoint import integrity
from segvit_jax.checkpoint import orbax_handlers
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

PyTree = Any

PARAMS_DIR = 'params'


# ------------------------------------------------------------------------------------------------
# Exported parameter directories.


def is_exported(path: str) -> bool:
  return all(fileio.exists(os.path.join(path, n)) for n in (PARAMS_DIR, config_lib.CONFIG_JSON))


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
    with ocp.Checkpointer(orbax_handlers.pytree_handler()) as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    config_lib.write_config(os.path.join(tmp, config_lib.CONFIG_JSON), config)
    config_lib.write_config_py(tmp)
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
# Where the params of a path are.


def _has_step_dirs(path: str) -> bool:
  return any(name.isdigit() and fileio.isdir(os.path.join(path, name))
             for name in fileio.listdir(path))


def training_checkpoint_root(path: str) -> Optional[str]:
  """The folder of numbered step folders: `path` itself or `path/checkpoints`; None if neither."""
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if _has_step_dirs(candidate):
      return candidate
  return None


class _Located(NamedTuple):
  kind: str  # 'exported' | 'training'
  root: str  # the exported directory, or the folder of step folders
  steps: list[int]  # a training workdir's finished steps, ascending
  step: int  # the step to read (0 for an exported directory)
  config_path: str

  def item(self, step: Optional[int] = None) -> str:
    """The Orbax item directory of the params (of `step`, default the one to read)."""
    if self.kind == 'exported':
      return os.path.join(self.root, PARAMS_DIR)
    return os.path.join(self.root, str(self.step if step is None else step), orbax_handlers.ITEM)


def _locate(path: str, flag: Optional[str], step: int = 0,
            step_flag: Optional[str] = None) -> _Located:
  """Where the params of `path` are: its latest step, or `step` when nonzero."""
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
    if step:
      raise UserError(f'{step_flag or "step"}={step}: {label} is an exported directory, which '
                      'has no steps; leave it out.')
    return _Located('exported', path, [], 0, os.path.join(path, config_lib.CONFIG_JSON))
  root = training_checkpoint_root(path)
  if root is None:
    if fileio.isdir(os.path.join(path, 'checkpoints')):
      raise UserError(f'{label} has no finished checkpoint yet (checkpoints/ holds no step).')
    raise UserError(f'{label} is neither a directory written by segvit_jax.convert (params/ and '
                    'config.json) nor a training workdir (checkpoints/<step>/).')
  steps = sorted(ocp.path.step.checkpoint_steps(root))
  if not steps:
    raise UserError(f'{label} has no finished checkpoint step in {root}.')
  if step and step not in steps:
    raise UserError(f'{step_flag or "step"}={step}: {label} has no such step; its steps are '
                    f'{", ".join(map(str, steps))}.')
  config_path = os.path.join(os.path.dirname(fileio.absolute(root)), config_lib.CONFIG_JSON)
  return _Located('training', root, steps, step or steps[-1], config_path)


def saved_config(path: str, flag: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config.json stored with an exported directory or a training workdir.

  Raises UserError when there is none (or only the flat layout of older versions), saying to
  pass --config; `flag` names the command-line flag `path` came from, for the messages.
  """
  config_path = _locate(path, flag).config_path
  if not fileio.exists(config_path):
    label = f'{flag}={path}' if flag else path
    raise UserError(f'{label} has no config.json: pass --config=configs/<name>.py (the config it '
                    'was trained with).')
  return config_lib.read_config(config_path)


def params_step(path: str, step: int = 0) -> int:
  """The training step of the params `load_params(path, ..., step=step)` loads: `step` or the
  latest finished step of a workdir, 0 for an exported directory."""
  return _locate(path, None, step).step


# ------------------------------------------------------------------------------------------------
# Loading parameters (either kind).


def load_params(path: str, abstract_params: PyTree, *,
                config: Optional[ml_collections.ConfigDict] = None,
                flag: Optional[str] = None, step: int = 0,
                step_flag: Optional[str] = None
                ) -> tuple[PyTree, Optional[ml_collections.ConfigDict]]:
  """(params, saved config) of an exported directory or a training workdir (latest step).

  Args:
    path: an exported directory, a training workdir, or its checkpoints/ folder.
    abstract_params: the params tree as `jax.ShapeDtypeStruct`s (unboxed). With shardings on
      every leaf the arrays are restored into them (on every host); without, as numpy arrays.
    config: the config `abstract_params` were built from: a mismatch is then reported as the
      config keys in which it differs from the saved config.json.
    flag: the flag or config key `path` came from ('config.init_checkpoint'), for messages.
    step: the step of a training workdir to read; 0: its latest.
    step_flag: the flag or config key that sets `step` ('--config.restore_step'), for messages.

  Returns the params and the config stored with them (None when there is none in the current
  layout). Raises UserError for a path that is not a checkpoint or does not fit, and for a
  damaged step, naming the earlier step that loads and how to ask for it.
  """
  label = f'{flag}={path}' if flag else path
  where = _locate(path, flag, step, step_flag)
  saved = config_lib.read_config_or_none(where.config_path)
  try:
    params = _read_params(where, where.step, abstract_params, config, label)
  except integrity.DamagedCheckpoint as damage:
    earlier = None
    for candidate in reversed([s for s in where.steps if s < where.step]):
      try:
        _read_params(where, candidate, abstract_params, config, label)
        earlier = candidate
        break
      except integrity.DamagedCheckpoint:
        continue
    fix = (f'step {earlier} loads: add {step_flag or "step"}={earlier}' if earlier is not None
           else 'no earlier step loads either')
    raise UserError(f'{label}: {damage}; {fix}.') from damage
  logging.info('Loaded the params of %s.', where.item())
  return params, saved


def _read_params(where: _Located, step: int, abstract_params: PyTree,
                 config: Optional[ml_collections.ConfigDict], label: str) -> PyTree:
  """The params of `step` of `where`, checked against their checksums; DamagedCheckpoint when
  its files cannot be read back whole."""
  training = where.kind == 'training'
  item = where.item(step)
  sums = integrity.saved_checksums(step, os.path.dirname(item)) if training else None
  with integrity.reading(step, os.path.join(item, '_METADATA')):
    tree = orbax_handlers.saved_tree(item)
  if training:
    tree = tree.get('params', {})
  per_layer = compatibility.is_per_layer(tree, config)
  if per_layer:
    abstract_params = segvit.unstack_params(abstract_params, config.model)
  compatibility.check_fits(tree, abstract_params, label=label, kind=where.kind,
                           saved_config=config_lib.read_config_or_none(where.config_path),
                           config=config, sections=('model',))
  shardings = [getattr(x, 'sharding', None) for x in jax.tree.leaves(abstract_params)]
  if any(s is not None for s in shardings) and not all(s is not None for s in shardings):
    raise ValueError('abstract_params: either every leaf carries a sharding or none does.')
  restore_args = orbax_handlers.restore_args(abstract_params)
  wrap = (lambda t: {'params': t}) if training else (lambda t: t)
  with integrity.reading(step, item), ocp.Checkpointer(orbax_handlers.pytree_handler()) as ckpt:
    restored = ckpt.restore(item, args=ocp.args.PyTreeRestore(
        item=wrap(abstract_params), restore_args=wrap(restore_args),
        partial_restore=training))
  if training:
    integrity.verify(step, os.path.dirname(item), {'params': restored['params']}, sums)
  params = restored['params'] if training else restored
  return segvit.stack_params(params, config.model) if per_layer else params
