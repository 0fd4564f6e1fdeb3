"""What to compile for: the TPU chip catalogue, topology names -> `Target`, a target's devices.

A target is a TPU slice named as gcloud names it ('v4-32', 'v5litepod-16': TensorCores for v4 and
v5p, chips for v5e and v6e) or as libtpu does ('v5e:4x4', 'v4:2x2x4'), or N simulated CPU devices
('cpu:8'). Its devices come from libtpu's topology description: they compile, they never run.
"""

import dataclasses
import importlib.util
import math
import os
import re
from typing import Optional

import jax
from jax.experimental import topologies

from segvit_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation."""
  generation: str  # libtpu's topology prefix
  hbm_gib: float  # published HBM capacity
  usable_hbm_gib: float  # what XLA lets one program use (its out-of-memory message)
  peak_flops: float  # dense bf16 FLOP/s, 2 per multiply-add
  hbm_bytes_per_s: float
  chip_config: str  # 'megacore': one JAX device per chip (v4 and v5p chips have 2 TensorCores)
  cores_per_chip: int  # what the gcloud type counts per chip
  dims: int  # torus dimensions
  sizes: tuple  # chip counts of the slices the gcloud types name


# Published per-chip figures (Google Cloud TPU documentation, cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e: "Peak compute per chip (bf16)", "HBM capacity", "HBM bandwidth"). Usable HBM: the
# capacity XLA reports when a program does not fit (libtpu 0.0.42, measured).
CHIPS = {
    'v4': Chip('v4', 32, 30.75, 275e12, 1200e9, 'megacore', 2, 3,
               tuple(2**k for k in range(2, 13))),
    'v5litepod': Chip('v5e', 16, 15.75, 197e12, 819e9, 'default', 1, 2,
                      (1, 4, 8, 16, 32, 64, 128, 256)),
    'v5p': Chip('v5p', 95, 95.74, 459e12, 2765e9, 'megacore', 2, 3,
                tuple(2**k for k in range(2, 13))),
    'v6e': Chip('v6e', 32, 31.25, 918e12, 1638e9, 'default', 1, 2,
                (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {'v5e': 'v5litepod', 'v5lite': 'v5litepod'}
_BY_GENERATION = {chip.generation: name for name, chip in CHIPS.items()}
_HOST_BOUNDS = (2, 2, 1)  # chips per VM of multi-host slices
_SINGLE_HOST_CHIPS = 8  # 2-D slices up to 2x4 are one VM


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for: a TPU slice (`chip` set) or N CPU devices (`chip` None)."""
  name: str
  chips: int
  processes: int
  chip: Optional[Chip] = None
  topology: str = ''  # libtpu's name, e.g. 'v4:2x2x4'
  host_bounds: tuple = (1, 1, 1)  # chips per host along each axis


def _slice_shape(chips: int, dims: int) -> list:
  """Cloud TPU's default slice shape: double the smallest side, the later one on ties."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    side = min(reversed(range(dims)), key=lambda i: shape[i])
    shape[side] *= 2
  return shape


def _tpu_target(name: str, chip: Chip, shape: list) -> Target:
  chips = math.prod(shape)
  shape3 = (*shape, 1)[:3]
  if chip.dims == 2 and chips <= _SINGLE_HOST_CHIPS:
    bounds = shape3
  else:
    bounds = tuple(min(b, s) for b, s in zip(_HOST_BOUNDS, shape3))
  processes = chips // math.prod(bounds)
  topology = f'{chip.generation}:{"x".join(str(s) for s in shape)}'
  return Target(name=name, chips=chips, processes=processes, chip=chip, topology=topology,
                host_bounds=bounds)


def parse_topology(name: str) -> Target:
  """'v4-32' / 'v5litepod-16' / 'v5e:4x4' / 'cpu:8' -> Target; UserError for anything else."""
  known = ', '.join(f'{n}-N' for n in CHIPS)
  text = name.strip().lower()
  if text.startswith('cpu:'):
    n = text[4:]
    if not n.isdigit() or int(n) < 1:
      raise UserError(f'--topology={name!r}: cpu:N wants a positive device count, e.g. cpu:8.')
    return Target(name=text, chips=int(n), processes=1)
  if ':' in text:  # libtpu's form
    generation, _, dims = text.partition(':')
    if generation not in _BY_GENERATION or not re.fullmatch(r'\d+(x\d+)+', dims):
      raise UserError(f'--topology={name!r} is not a TPU type: use one of {known}, a libtpu '
                      f'topology such as v5e:4x4 or v4:2x2x4, or cpu:N.')
    chip = CHIPS[_BY_GENERATION[generation]]
    shape = [int(s) for s in dims.split('x')]
    if len(shape) != chip.dims:
      raise UserError(f'--topology={name!r}: {generation} slices have {chip.dims} dimensions.')
    return _tpu_target(text, chip, shape)
  family, _, count = text.rpartition('-')
  family = _ALIASES.get(family, family)
  if family not in CHIPS or not count.isdigit():
    raise UserError(f'--topology={name!r} is not a TPU type: use one of {known} (as gcloud '
                    'names them, e.g. v4-32, v5litepod-16), or cpu:N.')
  chip = CHIPS[family]
  cores = int(count)
  chips, extra = divmod(cores, chip.cores_per_chip)
  if extra or chips not in chip.sizes:
    sizes = ', '.join(f'{family}-{s * chip.cores_per_chip}' for s in chip.sizes[:6])
    raise UserError(f'--topology={name!r} is not a {family} slice: use {sizes}, ...')
  return _tpu_target(text, chip, _slice_shape(chips, chip.dims))


def target_devices(target: Target) -> list:
  """The target's devices, for compilation only (TPU devices come from libtpu's topology)."""
  if target.chip is None:
    devices = jax.devices('cpu')
    if len(devices) < target.chips:
      raise UserError(f'--topology={target.name}: this process has {len(devices)} CPU devices; '
                      'run the tool in a fresh process (it sets the count before JAX starts).')
    return devices[:target.chips]
  if importlib.util.find_spec('libtpu') is None:
    raise UserError(f'--topology={target.name} needs libtpu: pip install -r requirements-tpu.txt '
                    '(or pip install --target=DIR -r requirements-tpu.txt and PYTHONPATH=DIR).')
  # Without these libtpu looks for a TPU VM's metadata and prints warnings; they name the
  # target, which is what the compilation is for.
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', target.name)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  topology = topologies.get_topology_desc(
      platform='tpu', topology_name=target.topology, chip_config_name=target.chip.chip_config,
      chips_per_host_bounds=target.host_bounds, num_slices=1)
  devices = list(topology.devices)
  if len(devices) != target.chips:
    raise RuntimeError(f'{target.topology}: libtpu gave {len(devices)} devices, expected '
                       f'{target.chips}.')
  return devices
