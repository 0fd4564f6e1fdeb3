"""The whole config checked against the devices and processes of a run, before anything is built.

    plan = preflight.check(config, num_devices=jax.device_count(),
                           process_count=jax.process_count())

`check` takes well under a second (no model, no data, no compilation) and raises
`segvit_jax.errors.UserError` at the first key that cannot work, with one line naming the key and
a value that would ("config.batch_size=6 does not divide over data x fsdp = 4 devices: use 4 or
8"). What works without changing any result is not an error: an eval batch that does not divide
over the devices is rounded up (`sharding.padded_batch_size`) and the returned plan says to what.
`segvit_jax.main` calls it once per run, before anything is built; `segvit_jax.aot.compile`
calls the same function.
"""

import dataclasses
import math
from typing import Sequence

import ml_collections

from segvit_jax import sharding
from segvit_jax.errors import UserError
from segvit_jax.models import segvit


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a checked config lays out over the devices."""
  mesh: dict  # {'data', 'fsdp', 'model'} -> size
  batch_shards: int  # data x fsdp: the ways every batch is split
  train_batch_per_shard: int  # config.batch_size / batch_shards (all micro-batches)
  micro_batch_per_shard: int  # ... / config.optim.grad_accum_steps: one forward pass
  eval_batch_size: int  # global eval batch: config.eval.batch_size rounded up
  eval_batch_per_shard: int


def check(config: ml_collections.ConfigDict, *, num_devices: int,
          process_count: int = 1) -> Plan:
  """Checks `config` for a run on `num_devices` devices in `process_count` processes.

  Raises UserError naming the first config key that cannot work. Returns the layout.
  """
  mesh = sharding.parse_mesh_spec(config.mesh, num_devices)
  shards = sharding.batch_shards(mesh)
  _check_processes(config, mesh, shards, process_count)
  micro = _check_train_batch(config, shards)
  eval_batch = _check_eval_batch(config, shards, process_count)
  _check_model(config)
  _check_sizes(config)
  _check_eval_settings(config)
  return Plan(mesh=mesh, batch_shards=shards,
              train_batch_per_shard=int(config.batch_size) // shards,
              micro_batch_per_shard=micro, eval_batch_size=eval_batch,
              eval_batch_per_shard=eval_batch // shards)


def _multiples_near(value: int, multiple: int) -> str:
  """'4 or 8': the multiples of `multiple` next to `value` (only the larger one below it)."""
  below = value // multiple * multiple
  above = below + multiple
  return f'{below} or {above}' if below > 0 else f'{above}'


def _check_processes(config, mesh, shards: int, process_count: int) -> None:
  # Every process feeds its own rows of each batch (input_pipeline), so each must hold whole
  # batch shards: a batch shard spread over two processes would need the same rows on both.
  if process_count < 1:
    raise ValueError(f'process_count={process_count} must be >= 1.')
  if shards % process_count:
    raise UserError(
        f'config.mesh={config.mesh!r} splits the batch over data x fsdp = {shards} devices, '
        f'which {process_count} processes cannot share out: make data x fsdp a multiple of '
        f'{process_count} (model axis {mesh["model"]} at most the devices of one process).')


def _check_train_batch(config, shards: int) -> int:
  batch = int(config.batch_size)
  accum = int(config.optim.grad_accum_steps)
  if accum < 1:
    raise UserError(f'config.optim.grad_accum_steps={accum} must be >= 1.')
  if batch <= 0:
    raise UserError(f'config.batch_size={batch} must be positive: use a multiple of data x '
                    f'fsdp = {shards}.')
  if batch % accum:
    raise UserError(
        f'config.optim.grad_accum_steps={accum} does not divide config.batch_size={batch}: use '
        f'a divisor of {batch}, or config.batch_size={_multiples_near(batch, accum * shards)}.')
  if (batch // accum) % shards:
    if accum == 1:
      raise UserError(
          f'config.batch_size={batch} does not divide over data x fsdp = {shards} devices: use '
          f'{_multiples_near(batch, shards)}.')
    raise UserError(
        f'config.batch_size={batch} / config.optim.grad_accum_steps={accum} = {batch // accum} '
        f'does not divide over data x fsdp = {shards} devices: use config.batch_size='
        f'{_multiples_near(batch, accum * shards)}.')
  return batch // accum // shards


def _check_eval_batch(config, shards: int, process_count: int) -> int:
  batch = int(config.eval.batch_size)
  if batch <= 0:
    raise UserError(f'config.eval.batch_size={batch} must be positive.')
  return sharding.padded_batch_size(batch, shards, process_count)


def _check_model(config) -> None:
  m, d = config.model, config.dataset
  if int(m.num_classes) != int(d.num_classes):
    raise UserError(
        f'config.model.num_classes={m.num_classes} differs from config.dataset.num_classes='
        f'{d.num_classes}: set both to the number of classes of the dataset.')
  try:
    segvit.check_model_config(m)
  except UserError:
    raise
  except ValueError as e:
    raise UserError(str(e)) from None


def _pair(config, key: str) -> tuple[int, int]:
  """config.<key> as a positive (h, w) of ints."""
  node = config
  for part in key.split('.'):
    node = node[part]
  value = tuple(node) if isinstance(node, Sequence) else (node,)
  if len(value) != 2 or any(int(v) != v or v <= 0 for v in value):
    raise UserError(f'config.{key}={value} must be a positive (h, w) pair of integers.')
  return int(value[0]), int(value[1])


def _check_multiple_of_patch(config, key: str) -> tuple[int, int]:
  size = _pair(config, key)
  patch = int(config.model.patch_size)
  if size[0] % patch or size[1] % patch:
    lower = tuple(max(s // patch, 1) * patch for s in size)
    upper = tuple(-(-s // patch) * patch for s in size)
    options = f'{upper}' if lower == upper else f'{lower} or {upper}'
    raise UserError(f'config.{key}={size} is not a multiple of config.model.patch_size='
                    f'{patch}: use {options}.')
  return size


def _check_sizes(config) -> None:
  # The ViT pads inputs to whole patches (mmseg's adaptive padding), but on a crop that is not
  # a multiple of the patch it would attend to padding tokens the official crops never have.
  # (config.model.img_size is checked by segvit.check_model_config.)
  for key in ('dataset.crop_size', 'dataset.eval_pad_size'):
    _check_multiple_of_patch(config, key)
  _pair(config, 'dataset.eval_label_pad_size')
  _pair(config, 'dataset.test_img_scale')
  if config.eval.mode == 'slide':
    _check_multiple_of_patch(config, 'eval.crop_size')


def _check_eval_settings(config) -> None:
  e = config.eval
  if e.mode not in ('slide', 'whole'):
    raise UserError(f"config.eval.mode={e.mode!r}: use 'slide' or 'whole'.")
  if e.mode == 'slide':
    crop, stride = _pair(config, 'eval.crop_size'), _pair(config, 'eval.stride')
    if stride[0] > crop[0] or stride[1] > crop[1]:
      raise UserError(
          f'config.eval.stride={stride} is larger than config.eval.crop_size={crop}: windows '
          f'would leave pixels unscored; use a stride of at most {crop}.')
  if e.multi_scale:
    scales = tuple(e.scales)
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
      raise UserError(f'config.eval.scales={scales} must be positive ratios, e.g. (1.0,).')
