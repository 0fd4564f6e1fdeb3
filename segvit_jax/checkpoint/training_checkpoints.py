"""Training checkpoints: `WORKDIR/checkpoints/<step>/`, saved and restored by `Checkpointer`.

An Orbax `CheckpointManager` with one item (`orbax_handlers.ITEM`: the whole train state), written
asynchronously, keeping the last N steps plus the best by mIoU. Every host calls `save` /
`restore`; Orbax writes each host's shards and finalises the step directory atomically, so a run
killed mid-save leaves the previous steps intact.

Storage faults lose nothing:
- A step that does not read back whole (`integrity.DamagedCheckpoint`) is skipped by
  `restore_newest`, which resumes from the newest step that does and sets the newer ones aside.
- A save that fails (a full disk, an I/O error) is a `StorageError` naming the directory, the
  size of a checkpoint and the space free; its half-written temporary directory is removed, so
  the last complete step is where the rerun continues.
"""

import contextlib
import os
import shutil
import time
from typing import Any, Iterator, Mapping, NamedTuple, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from segvit_jax import cli
from segvit_jax import config as config_lib
from segvit_jax import fileio
from segvit_jax.checkpoint import compatibility
from segvit_jax.checkpoint import integrity
from segvit_jax.checkpoint import orbax_handlers
from segvit_jax.errors import StorageError
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

PyTree = Any

BEST_METRIC = 'eval/miou'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(fileio.absolute(workdir), 'checkpoints')


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree`'s leaves with the given shardings (the restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_bytes(tree: PyTree) -> int:
  """Bytes of the arrays of `tree` (arrays or ShapeDtypeStructs): what a checkpoint of it holds."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _best_metric(metrics: Mapping[str, Any]) -> float:
  return float(metrics[BEST_METRIC])


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
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=orbax_handlers.pytree_handler())
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
    sums = integrity.checksums(state)
    self._bytes = state_bytes(state)
    # Orbax's save waits for the previous one first: waiting here names the step that failed.
    self.wait()
    with self._writing(step):
      saved = self._manager.save(int(step), args=ocp.args.PyTreeSave(state), metrics=metrics,
                                 force=True,
                                 custom_metadata={integrity.CHECKSUMS_KEY: sums})
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
    """The state at `step`, laid out as `abstract_state`'s shardings say (numpy arrays where a
    leaf has none).

    Raises UserError when the saved state does not fit `abstract_state`, naming the keys in
    which `config` (the current one) differs from the workdir's config.json, and
    DamagedCheckpoint when the step's files cannot be read back whole.
    """
    step_dir = os.path.join(self.directory, str(int(step)))
    item = os.path.join(step_dir, orbax_handlers.ITEM)
    workdir = (os.path.dirname(self.directory) if os.path.basename(self.directory) ==
               'checkpoints' else self.directory)
    sums = integrity.saved_checksums(step, step_dir)
    with integrity.reading(step, os.path.join(item, '_METADATA')):
      saved = orbax_handlers.saved_tree(item)
    per_layer = compatibility.is_per_layer(saved.get('params', {}), config)
    target = segvit.unstack_params(abstract_state, config.model) if per_layer else abstract_state
    compatibility.check_fits(
        saved, target, label=workdir, kind='resume',
        saved_config=config_lib.read_config_or_none(
            os.path.join(workdir, config_lib.CONFIG_JSON)),
        config=config, sections=('model', 'optim'))
    with integrity.reading(step, item):
      restored = self._manager.restore(int(step), args=ocp.args.PyTreeRestore(
          item=target, restore_args=orbax_handlers.restore_args(target)))
    integrity.verify(step, step_dir, restored, sums)
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
      except integrity.DamagedCheckpoint as e:
        damage = e
      if integrity.agreed(damage is None):
        break
      damaged.append(damage or integrity.DamagedCheckpoint(
          step, os.path.join(self.directory, str(step)), 'unreadable on another process'))
    else:
      if not damaged:
        return None
      raise UserError(
          f'no checkpoint in {self.directory} can be read: '
          f'{"; ".join(str(d) for d in damaged)}; nothing was changed: restore the files, or '
          'choose another --workdir to start afresh.')
    for damage in damaged:
      kept = integrity.set_aside(self.directory, damage.step)
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
