"""Orbax checkpoints of the train state: asynchronous saves, last N plus the best by mIoU.

Layout: `WORKDIR/checkpoints/<step>/` (Orbax `CheckpointManager`, one item: the whole train state
as a PyTree of arrays). Every host calls `save` / `restore`; Orbax writes each host's shards and
finalises the step directory atomically, so a run killed mid-save leaves the previous steps intact.

Restoring takes an abstract state whose leaves are `jax.ShapeDtypeStruct`s carrying the TARGET
shardings, so a checkpoint written on one mesh or device count restores onto any other.
"""

import os
from typing import Any, Mapping, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from segvit_jax import fileio

PyTree = Any

BEST_METRIC = 'eval/miou'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(fileio.absolute(workdir), 'checkpoints')


def _best_metric(metrics: Mapping[str, Any]) -> float:
  return float(metrics[BEST_METRIC])


class Checkpointer:
  """Saves and restores train states under `directory`.

  Keeps the `keep` most recent steps plus the one with the highest `eval/miou` among the steps
  saved with metrics (`save(..., metrics={'eval/miou': ...})`).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f'config.keep_checkpoints must be at least 1, got {keep}.')
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

  def restore(self, step: int, abstract_state: PyTree) -> PyTree:
    """The state at `step`, laid out as `abstract_state`'s shardings say."""
    return self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))

  def restore_params(self, step: int, abstract_params: PyTree) -> PyTree:
    """Only `state.params` of `step` (the optimizer state is not read), laid out as given."""
    item = {'params': abstract_params}
    restored = self._manager.restore(int(step), args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return restored['params']

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


# Interim API (replaced by the checkpoint I/O layer).
def load_params(path, abstract_params, config=None):
  from segvit_jax import convert  # pylint: disable=g-import-not-at-top
  if convert.is_converted_dir(path):
    return convert.restore_params(path, abstract_params), convert.load_converted_config(path)
  root = training_checkpoint_root(path)
  ckpt = Checkpointer(root, async_save=False, read_only=True)
  try:
    return ckpt.restore_params(ckpt.latest_step(), abstract_params), None
  finally:
    ckpt.close()


def params_step(path):
  root = training_checkpoint_root(path)
  if root is None:
    return 0
  ckpt = Checkpointer(root, async_save=False, read_only=True)
  try:
    return int(ckpt.latest_step())
  finally:
    ckpt.close()


def write_config(path, config):
  with fileio.open_file(path, 'w') as f:
    f.write(config.to_json_best_effort(indent=1))
