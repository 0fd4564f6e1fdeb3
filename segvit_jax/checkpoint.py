"""The two kinds of checkpoint, one `config.json` format, and the one loader of parameters.

Training checkpoints: `WORKDIR/checkpoints/<step>/` (Orbax `CheckpointManager`, one item: the whole
train state), written by `Checkpointer` asynchronously, the last N steps plus the best by mIoU.
Every host calls `save` / `restore`; Orbax writes each host's shards and finalises the step
directory atomically, so a run killed mid-save leaves the previous steps intact.

Storage faults lose nothing:
- Each step records checksums of its arrays' bits (`checksums`, in the step's custom metadata),
  because Orbax checks its own indexes but not the array bytes: a flipped byte in a data file
  reads back as a wrong value. A step whose files cannot be read or whose values do not match is
  damaged (`DamagedCheckpoint`): training resumes from the newest step that reads back whole and
  sets the damaged ones aside, renamed `<step>.damaged` (kept, never read or counted again);
  `load_params` names the damaged step and the earlier one that loads. Steps saved before the
  checksums existed are read unchecked.
- A save that fails (a full disk, an I/O error) is a `StorageError` naming the directory, the
  size of a checkpoint and the space free; its half-written temporary directory is removed, so
  the last complete step is where the rerun continues.

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
read by `read_config` (JSON lists come back as tuples, as `segvit_jax.config` writes sequences).
"""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from segvit_jax import config as config_lib
from segvit_jax import cli
from segvit_jax import fileio
from segvit_jax.errors import StorageError
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

PyTree = Any

BEST_METRIC = 'eval/miou'
PARAMS_DIR = 'params'
CONFIG_JSON = 'config.json'
_ITEM = 'default'  # the CheckpointManager's name for its single item
_STEP_METADATA = '_CHECKPOINT_METADATA'  # Orbax's per-step JSON, with the custom metadata
_CHECKSUMS = 'segvit_checksums'  # our key in that custom metadata
_DAMAGED = '.damaged'  # suffix of a step directory set aside; not a step name to Orbax
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

  Keys the file lacks (added to segvit_jax after it was written) take `segvit_jax.config`'s defaults.
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
  return ml_collections.ConfigDict(_merge(config_lib.get_base_config().to_dict(), _tuples(data)))


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
# Checksums and damaged steps.


def _sums(x, xp) -> Any:
  """(sum of the words, sum of each word times its 1-based row-major position), mod 2^32, of
  the bits of array `x`, with `xp` = jax.numpy (device arrays) or numpy (host arrays): a flipped
  bit changes the first, two swapped words the second. Integer sums wrap exactly in any order,
  so every mesh and both implementations give the same figures; the positions come from iotas
  in the array's own layout, so a sharded array is not gathered."""
  if x.dtype == xp.bool_:
    x = x.astype(xp.uint8)
  words = (jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{x.dtype.itemsize * 8}'))
           if xp is jnp else np.ascontiguousarray(x).view(f'uint{x.dtype.itemsize * 8}'))
  words = words.astype(xp.uint32)
  position = xp.zeros(words.shape, xp.uint32)
  for axis, size in enumerate(words.shape):
    iota = (jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) if xp is jnp else
            np.arange(size, dtype=np.uint32).reshape([-1 if a == axis else 1
                                                     for a in range(words.ndim)]))
    position = position * xp.uint32(size) + iota
  return xp.stack([xp.sum(words, dtype=xp.uint32),
                   xp.sum(words * (position + xp.uint32(1)), dtype=xp.uint32)])


# Big arrays (and arrays split over processes) are summed where they are, all by one program:
# one program per array would make every process of a job set up its collectives once per
# array. Smaller ones are copied to the host and summed there, which costs less than compiling
# (measured on the tiny synthetic model: 1.8 s to compile the program of its 252 leaves on CPU).
_device_sums = jax.jit(lambda arrays: [_sums(x, jnp) for x in arrays])
_HOST_SUM_BYTES = 4 << 20


def _on_host(x: Any) -> bool:
  return not isinstance(x, jax.Array) or (
      x.nbytes <= _HOST_SUM_BYTES and (x.is_fully_addressable or x.is_fully_replicated))


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def checksums(tree: PyTree) -> dict[str, list[int]]:
  """'params/backbone/...' -> `_sums` of every array of `tree` (device or host arrays; the
  state or a subtree with the same key names, e.g. {'params': ...})."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  on_host = [_on_host(x) for _, x in leaves]
  host = jax.device_get([x for (_, x), h in zip(leaves, on_host) if h])
  device = [x for (_, x), h in zip(leaves, on_host) if not h]
  device = jax.device_get(_device_sums(device)) if device else []
  host_sums = iter([_sums(np.asarray(x), np) for x in host])
  device_sums = iter(device)
  sums = [next(host_sums) if h else next(device_sums) for h in on_host]
  return {'/'.join(_key_name(k) for k in path): [int(v) for v in value]
          for (path, _), value in zip(leaves, sums)}


def state_bytes(tree: PyTree) -> int:
  """Bytes of the arrays of `tree` (arrays or ShapeDtypeStructs): what a checkpoint of it holds."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class DamagedCheckpoint(UserError):
  """A step's files cannot be read back whole: `path` (a file, or the step directory) and why."""

  def __init__(self, step: int, path: str, reason: str):
    self.step, self.path, self.reason = int(step), path, reason
    super().__init__(f'checkpoint step {step} cannot be read ({path}: {reason})')


# TensorStore's messages name the file it failed on, the OCDBT key (the array) inside it, and end
# with details in brackets (its spec): 'Error reading "KEY" in OCDBT database at local file
# "DIR": REASON [tensorstore_spec=...]'.
_FILE = re.compile(r'file "([^"]+)"(?:: ([^\[]*))?')
_OCDBT_KEY = re.compile(r'Error reading "([^"/]+)(?:/[^"]*)?" in OCDBT database')


def _damage(step: int, error: BaseException, fallback: str) -> Optional[DamagedCheckpoint]:
  """The DamagedCheckpoint a failed read of `step` means; None when `error` is not a failed read
  (a bug, or a UserError such as another model's checkpoint). `fallback`: the file being read
  when the message names none."""
  if isinstance(error, UserError):
    return None
  for e in fileio._chain(error):  # pylint: disable=protected-access
    text = str(e)
    found = _FILE.findall(text)
    if found:
      path, reason = found[-1]
      key = _OCDBT_KEY.search(text)
      reason = (reason.split(';')[0].strip() or fileio.io_failure(e) or 'unreadable')
      if key:
        reason = f'array {key.group(1)}: {reason}'
      return DamagedCheckpoint(step, path.rstrip('/'), reason)
    if isinstance(e, FileNotFoundError):
      return DamagedCheckpoint(step, e.filename or fallback, 'missing')
    if isinstance(e, json.JSONDecodeError):
      return DamagedCheckpoint(step, fallback, f'not valid JSON: {e.msg}, byte {e.pos}')
    if isinstance(e, UnicodeDecodeError):
      return DamagedCheckpoint(step, fallback, f'not text (a byte 0x{e.object[e.start]:02x} at '
                                               f'{e.start})')
  reason = fileio.io_failure(error)
  return None if reason is None else DamagedCheckpoint(step, fallback, reason)


@contextlib.contextmanager
def _reading(step: int, path: str) -> Iterator[None]:
  """Turns a failed read of `step` (reading `path`) into DamagedCheckpoint; bugs pass."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    damage = _damage(step, e, path)
    if damage is None:
      raise
    raise damage from e


def _saved_checksums(step: int, step_dir: str) -> Optional[dict[str, list[int]]]:
  """The checksums recorded with a step; None for a step saved before they existed. A missing or
  unreadable metadata file is damage (Orbax itself reads it leniently: it only logs)."""
  path = os.path.join(step_dir, _STEP_METADATA)
  with _reading(step, path):
    with fileio.open_file(path) as f:
      metadata = json.load(f)
  return (metadata.get('custom_metadata') or {}).get(_CHECKSUMS)


def _verify(step: int, step_dir: str, tree: PyTree,
            saved: Optional[Mapping[str, list[int]]]) -> None:
  """Raises DamagedCheckpoint unless `tree`'s arrays have the checksums saved for them."""
  if saved is None:
    return
  differ = [key for key, sums in checksums(tree).items() if saved.get(key, sums) != sums]
  if differ:
    raise DamagedCheckpoint(step, os.path.join(step_dir, _ITEM),
                            f'the bytes of {_listed(differ)} differ from the checksums saved '
                            'with them')


def _agreed(ok: bool) -> bool:
  """Whether every process found `ok` (a file may be damaged for one host's reads only): all
  processes then take the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _remove_unfinished(directory: str, settle: float = 0.5, limit: float = 30.0) -> None:
  """Removes the directories of unfinished saves ('<step>.orbax-checkpoint-tmp...', never read
  as steps by Orbax), freeing their space. TensorStore may still complete writes of a failed
  save after Orbax gave up on it, making its directories again: removed until none reappears
  for `settle` seconds."""
  start = quiet = time.monotonic()
  while time.monotonic() - start < limit:
    names = ocp.path.step.tmp_checkpoints(directory)
    for name in names:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    now = time.monotonic()
    if names:
      quiet = now
    elif now - quiet >= settle:
      return
    time.sleep(0.05)


def _set_aside(directory: str, step: int) -> str:
  """Renames step directory `step` to `<step>.damaged` (or `.damaged-2`, ...): kept, but no
  longer a step name to Orbax (its steps are integer names) nor to `_has_step_dirs`."""
  target = os.path.join(directory, f'{step}{_DAMAGED}')
  n = 1
  while fileio.exists(target):
    n += 1
    target = os.path.join(directory, f'{step}{_DAMAGED}-{n}')
  if jax.process_index() == 0:
    fileio.rename(os.path.join(directory, str(step)), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'segvit_jax: step {step} set aside')
  return target


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


class Restored(NamedTuple):
  """What `Checkpointer.restore_newest` found: a step and its state."""
  step: int
  state: PyTree


class Checkpointer:
  """Saves and restores train states under `directory` (WORKDIR/checkpoints).

  Keeps the `keep` most recent steps plus the one with the highest `eval/miou` among the steps
  saved with metrics (`save(..., metrics={'eval/miou': ...})`). A failed save raises
  StorageError from `save`, `wait` or `close` (Orbax reports an asynchronous save's failure at
  the next call that waits for it).
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
    self._unfinished: Optional[int] = None  # the step of a save not known to be complete
    self._bytes = 0  # of the last state saved
    self._failed = False

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, metrics: Optional[Mapping[str, float]] = None) -> None:
    """Starts an (asynchronous) save of `state` at `step`; returns before the write finishes."""
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    if self._read_only:
      raise ValueError(f'{self.directory} was opened read-only.')
    # Now, while `state` is alive: the next train step donates its buffers.
    sums = checksums(state)
    self._bytes = state_bytes(state)
    # Orbax's save waits for the previous one first: waiting here names the step that failed.
    self.wait()
    with self._writing(step):
      saved = self._manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics,
                                 force=True, custom_metadata={_CHECKSUMS: sums})
    if saved:
      self._unfinished = int(step)
      logging.info('Saving checkpoint at step %d to %s.', step, self.directory)

  @contextlib.contextmanager
  def _writing(self, step: Optional[int]) -> Iterator[None]:
    """Turns a failed save into StorageError after removing its half-written directory."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = fileio.io_failure(e)
      if reason is None or isinstance(e, UserError):
        raise
      self._failed = True
      failed = self._unfinished if self._unfinished is not None else step
      raise StorageError(self._save_failure(failed, reason)) from e

  def _save_failure(self, step: Optional[int], reason: str) -> str:
    with contextlib.suppress(Exception):  # the failed save's own error, again
      self._manager.wait_until_finished()
    if jax.process_index() == 0 and not fileio.is_url(self.directory):
      _remove_unfinished(self.directory)
    self._manager.reload()
    last = self._manager.latest_step()
    kept = (f'the last complete checkpoint, step {last}, is kept: free space, then rerun the '
            'same command to continue from it' if last is not None else
            'there is no complete checkpoint yet: free space, then rerun the same command')
    return (f'cannot write the checkpoint of step {step} to {self.directory} ({reason}): a '
            f'checkpoint of this model needs '
            f'{fileio.size_text(self._checkpoint_bytes(last, self._bytes))}, '
            f'{fileio.free_text(self.directory)}; {kept}.')

  def _checkpoint_bytes(self, step: Optional[int], arrays: int) -> int:
    """What one checkpoint takes: its `arrays` bytes, or the files of step `step` if more
    (Orbax's metadata; its compression may make them less)."""
    on_disk = 0
    if step is not None and not fileio.is_url(self.directory):
      for parent, _, files in os.walk(os.path.join(self.directory, str(step))):
        on_disk += sum(os.path.getsize(os.path.join(parent, f)) for f in files)
    return max(arrays, on_disk)

  def space_warning(self, abstract_state: PyTree) -> Optional[str]:
    """A warning line when the directory has less space free than two checkpoints of
    `abstract_state` take; None when it has enough or cannot tell (a bucket)."""
    free = fileio.free_bytes(self.directory)
    needed = 2 * self._checkpoint_bytes(self.latest_step(), state_bytes(abstract_state))
    if free is None or free >= needed:
      return None
    return (f'Warning: {self.directory} has {fileio.size_text(free)} free, less than the '
            f'{fileio.size_text(needed)} two checkpoints of this model take; saving will fail '
            'when the disk is full.')

  def restore(self, step: int, abstract_state: PyTree,
              config: Optional[ml_collections.ConfigDict] = None) -> PyTree:
    """The state at `step`, laid out as `abstract_state`'s shardings say.

    Raises UserError when the saved state does not fit `abstract_state`, naming the keys in
    which `config` (the current one) differs from the workdir's config.json, and
    DamagedCheckpoint when the step's files cannot be read back whole.
    """
    step_dir = os.path.join(self.directory, str(int(step)))
    item = os.path.join(step_dir, _ITEM)
    workdir = (os.path.dirname(self.directory) if os.path.basename(self.directory) ==
               'checkpoints' else self.directory)
    sums = _saved_checksums(step, step_dir)
    with _reading(step, os.path.join(item, '_METADATA')):
      saved = _saved_tree(item)
    per_layer = _per_layer(saved.get('params', {}), config)
    target = segvit.unstack_params(abstract_state, config.model) if per_layer else abstract_state
    _check_fits(saved, target, label=workdir, kind='resume',
                saved_config=_saved_config_or_none(os.path.join(workdir, CONFIG_JSON)),
                config=config, sections=('model', 'optim'))
    with _reading(step, item):
      restored = self._manager.restore(int(step), args=ocp.args.StandardRestore(target))
    _verify(step, step_dir, restored, sums)
    return segvit.stack_params(restored, config.model) if per_layer else restored

  def restore_newest(self, abstract_state: PyTree,
                     config: Optional[ml_collections.ConfigDict] = None) -> Optional[Restored]:
    """The newest step that reads back whole (None when there is no step at all).

    Newer damaged steps are then set aside, each with one line on the console. When no step
    can be read, raises UserError and changes nothing.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      damage = None
      try:
        state = self.restore(step, abstract_state, config)
      except DamagedCheckpoint as e:
        damage = e
      if _agreed(damage is None):
        break
      damaged.append(damage or DamagedCheckpoint(step, os.path.join(self.directory, str(step)),
                                                 'unreadable on another process'))
    else:
      if not damaged:
        return None
      raise UserError(
          f'no checkpoint in {self.directory} can be read: '
          f'{"; ".join(str(d) for d in damaged)}; nothing was changed: restore the files, or '
          'choose another --workdir to start afresh.')
    for damage in damaged:
      kept = _set_aside(self.directory, damage.step)
      cli.say(f'Warning: {damage}; continuing from step {step}; step {damage.step} is kept '
                  f'as {kept}.')
    if damaged:
      self._manager.reload()
    return Restored(step, state)

  def wait(self) -> None:
    with self._writing(None):
      self._manager.wait_until_finished()
    self._unfinished = None

  def close(self) -> None:
    if self._failed:  # reported; Orbax would raise the same failure again
      with contextlib.suppress(Exception):
        self._manager.close()
      return
    self.wait()
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
    return os.path.join(self.root, str(self.step if step is None else step), _ITEM)


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
    return _Located('exported', path, [], 0, os.path.join(path, CONFIG_JSON))
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
  config_path = os.path.join(os.path.dirname(fileio.absolute(root)), CONFIG_JSON)
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
  return read_config(config_path)


def params_step(path: str, step: int = 0) -> int:
  """The training step of the params `load_params(path, ..., step=step)` loads: `step` or the
  latest finished step of a workdir, 0 for an exported directory."""
  return _locate(path, None, step).step


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
  saved = _saved_config_or_none(where.config_path)
  try:
    params = _read_params(where, where.step, abstract_params, config, label)
  except DamagedCheckpoint as damage:
    earlier = None
    for candidate in reversed([s for s in where.steps if s < where.step]):
      try:
        _read_params(where, candidate, abstract_params, config, label)
        earlier = candidate
        break
      except DamagedCheckpoint:
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
  sums = _saved_checksums(step, os.path.dirname(item)) if training else None
  with _reading(step, os.path.join(item, '_METADATA')):
    tree = _saved_tree(item)
  if training:
    tree = tree.get('params', {})
  per_layer = _per_layer(tree, config)
  if per_layer:
    abstract_params = segvit.unstack_params(abstract_params, config.model)
  _check_fits(tree, abstract_params, label=label, kind=where.kind,
              saved_config=_saved_config_or_none(where.config_path), config=config,
              sections=('model',))
  shardings = [getattr(x, 'sharding', None) for x in jax.tree.leaves(abstract_params)]
  if all(s is not None for s in shardings):
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  elif any(s is not None for s in shardings):
    raise ValueError('abstract_params: either every leaf carries a sharding or none does.')
  else:
    restore_args = jax.tree.map(
        lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), abstract_params)
  wrap = (lambda t: {'params': t}) if training else (lambda t: t)
  with _reading(step, item), ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item=wrap(abstract_params), restore_args=wrap(restore_args),
        partial_restore=training))
  if training:
    _verify(step, os.path.dirname(item), {'params': restored['params']}, sums)
  params = restored['params'] if training else restored
  return segvit.stack_params(params, config.model) if per_layer else params


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
