"""Device mesh and logical-axis sharding rules.

The mesh always has the three axes ('data', 'fsdp', 'model'); `config.mesh` names the sizes of the
ones it uses ('data:-1', 'data:4,model:2', 'data:2,fsdp:4') and the others get size 1, so the rules
below never name a missing axis. The batch is split over data x fsdp; parameters are split over
fsdp along their 'embed' dimension (ZeRO-3 style) and over model along 'mlp' / 'heads'
(Megatron style). Dimensions that a mesh axis does not divide stay replicated.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from segvit_jax.errors import UserError

PyTree = Any

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

# Logical axis name -> mesh axes. Names the model annotates but that are not listed stay replicated.
LOGICAL_AXIS_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('classes', None),
    ('queries', None),
    ('layers', None),  # the stacked blocks of a scanned backbone segment: every device holds all
)


# Whether model code traced under `axis_rules()` sees the rules, binding its activation
# constraints (`nn.with_logical_constraint`) to the mesh. Off for now: with the rules active,
# flax's DenseGeneral (models/layers.py Attention) applies the 3-d logical names of its kernels
# to the flat 2-d kernel it initialises, and both init and apply (which re-runs the init under
# eval_shape to check shapes) fail on a mesh. Parameter layouts do not depend on this switch:
# `logical_to_shardings` applies the rules explicitly.
APPLY_RULES_IN_MODEL = False


def axis_rules():
  """Context under which the trainer traces the model: the logical-axis rules of this module."""
  return nn.logical_axis_rules(LOGICAL_AXIS_RULES if APPLY_RULES_IN_MODEL else ())


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """'data:4,model:2' -> {'data': 4, 'fsdp': 1, 'model': 2} for `num_devices` devices.

  At most one axis may be -1: it takes the devices the others leave. The product must equal
  `num_devices`. A spec that cannot work raises UserError naming config.mesh.
  """
  def fail(message):
    raise UserError(f'config.mesh={spec!r}: {message}')

  sizes = {axis: 1 for axis in MESH_AXES}
  seen = set()
  for part in [p.strip() for p in spec.split(',') if p.strip()]:
    name, sep, size = part.partition(':')
    name = name.strip()
    if not sep or name not in MESH_AXES:
      fail(f'{part!r} is not "axis:size" with axis in {MESH_AXES}; e.g. \'data:-1\'.')
    if name in seen:
      fail(f'names axis {name!r} twice.')
    seen.add(name)
    try:
      sizes[name] = int(size)
    except ValueError:
      fail(f'size {size.strip()!r} of {name!r} is not an integer.')
    if sizes[name] == 0 or sizes[name] < -1:
      fail(f'size of {name!r} must be positive or -1.')
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    fail(f'only one axis may be -1, got {free}.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      fail(f'the fixed axes use {fixed} devices, which does not divide the {num_devices} '
           f'available; use sizes whose product divides {num_devices}.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    fail(f'uses {fixed} devices but {num_devices} are available; use -1 for one axis to take '
         "the rest (e.g. 'data:-1').")
  return sizes


def batch_shards(mesh_sizes: dict[str, int]) -> int:
  """How many ways the batch is split: data x fsdp."""
  return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def padded_batch_size(batch_size: int, num_shards: int, process_count: int = 1) -> int:
  """`batch_size` rounded up to a multiple of the batch shards and of the process count.

  Evaluation batches have this size (the last one padded with valid=False rows): every device
  gets ceil(batch_size / num_shards) examples, as it would with rows of padding in every batch,
  and the metrics do not depend on how examples are grouped into batches.
  """
  multiple = math.lcm(num_shards, process_count)
  return -(-batch_size // multiple) * multiple


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'model') mesh for `spec` over `devices` (default: all devices).

  Axis types are Auto: Flax linen's logical constraints do not accept Explicit axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 3-class output on model:2)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries):
    if entry is None:
      fitted.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    kept = []
    size = 1
    for axis in axes:
      if dim % (size * mesh.shape[axis]) == 0:
        kept.append(axis)
        size *= mesh.shape[axis]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while fitted and fitted[-1] is None:  # P('x', None) and P('x') mean the same; keep one form
    fitted.pop()
  return P(*fitted)


def logical_to_shardings(abstract_boxed: PyTree, mesh: Mesh,
                         rules=LOGICAL_AXIS_RULES) -> PyTree:
  """NamedShardings for a tree of (possibly `nn.Partitioned`) abstract arrays.

  `abstract_boxed` is what `jax.eval_shape(model.init, ...)` returns; the result has the unboxed
  tree's structure. Leaves without logical names are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_boxed)
  shapes = nn.unbox(abstract_boxed)

  def one(logical, shaped):
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules) if logical else P()
    return NamedSharding(mesh, _fit_spec(mesh_spec, shaped.shape, mesh))

  return jax.tree.map(one, logical_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def update_sharding(param_sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """Where the train state keeps one parameter and its optimizer state, and the update runs:
  the parameter's (model) layout, with the batch axes that replicate it splitting a dimension
  they divide.

  Every data-parallel device would otherwise read the whole gradient, both Adam moments and the
  parameters and write three of them back each step; split this way each does 1 / N of that
  update, the gradients are reduce-scattered instead of all-reduced, and the step gathers the
  parameters into the model's layout before the forward pass. The update is elementwise: the
  same numbers either way. A leaf that no such dimension divides keeps its parameter's layout.
  """
  mesh = param_sharding.mesh
  spec = list(param_sharding.spec) + [None] * (len(shape) - len(param_sharding.spec))
  # Axes of size 1 split nothing: a dimension that names only those is free.
  splits = [tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if mesh.shape[a] > 1)
            for e in spec]
  free = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1 and not any(a in s for s in splits))
  size = math.prod(mesh.shape[a] for a in free)
  dims = [d for d, (n, s) in enumerate(zip(shape, splits)) if not s and n % size == 0]
  if not free or not dims:
    return param_sharding
  # The largest, the minor one last: TPU tiles pad a narrow minor dimension to 128 lanes.
  spec[max(dims, key=lambda d: (d != len(shape) - 1, shape[d]))] = (
      free[0] if len(free) == 1 else free)
  return NamedSharding(mesh, _fit_spec(P(*spec), shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Where an `ndim`-d batch array lives: its leading (batch) dimension split over data x fsdp
  (the ones `mesh` has), the other dimensions replicated. Train steps, eval steps and the input
  pipeline's global batches all use it."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

