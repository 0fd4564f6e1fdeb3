"""What every run of a config builds first: the mesh, the model, the optimizer and the state layout.

    run = build.setup(config, devices)  # Setup(mesh, model, tx, schedule, spec); allocates nothing

Shared by training (`loop`), evaluation of a checkpoint (`eval_mode`), the compile tool
(`segvit_jax.aot.compile`) and the benchmarks, so that all of them build the same programs. The
config is expected to be checked already (`preflight.check`, run once by `segvit_jax.main` and by
the compile tool before anything is built).
"""

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from segvit_jax import optim
from segvit_jax import sharding
from segvit_jax.models import segvit
from segvit_jax.training import state as state_lib


class Setup(NamedTuple):
  mesh: Mesh
  model: segvit.SegViT
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]  # step (updates done) -> learning rate
  spec: state_lib.StateSpec


def setup(config: ml_collections.ConfigDict,
          devices: Optional[Sequence[jax.Device]] = None) -> Setup:
  """Mesh over `devices` (default: all), model, optimizer and the state layout; allocates
  nothing."""
  jax.config.update('jax_threefry_partitionable', True)
  mesh = sharding.make_mesh(config.mesh, devices)
  # The attention implementation follows the mesh's devices (e.g. TPU compiled from a CPU host).
  model = segvit.build_model(config.model, platform=mesh.devices.flat[0].platform)
  tx, schedule = optim.make_optimizer(config)
  return Setup(mesh, model, tx, schedule, state_lib.state_spec(model, tx, mesh))
