"""Interim pre-flight check (replaced by the full one)."""

from segvit_jax import sharding
from segvit_jax.errors import UserError
from segvit_jax.models import segvit


def check(config, *, num_devices: int, process_count: int) -> None:
  try:
    sizes = sharding.parse_mesh_spec(config.mesh, num_devices)
    segvit.check_model_config(config.model)
  except ValueError as e:
    raise UserError(str(e)) from e
  shards = sizes['data'] * sizes['fsdp']
  if config.batch_size % shards:
    raise UserError(f'config.batch_size={config.batch_size} does not divide over data x fsdp = '
                    f'{shards} devices.')
