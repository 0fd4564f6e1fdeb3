"""Whether a training checkpoint step reads back whole, and what is done with one that does not.

Orbax checks its own indexes but not the array bytes: a flipped byte in a data file reads back as
a wrong value. So each step records checksums of its arrays' bits (`checksums`, in the step's
custom metadata, key `CHECKSUMS_KEY`), and a step whose files cannot be read or whose values do
not match them is damaged (`DamagedCheckpoint`). Steps saved before the checksums existed are read
unchecked. A damaged step is set aside (`set_aside`), renamed `<step>.damaged`: kept, never read
or counted again.
"""

import contextlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from segvit_jax import fileio
from segvit_jax.checkpoint.compatibility import listed
from segvit_jax.checkpoint.orbax_handlers import ITEM
from segvit_jax.errors import UserError

PyTree = Any

STEP_METADATA = '_CHECKPOINT_METADATA'  # Orbax's per-step JSON, with the custom metadata
CHECKSUMS_KEY = 'segvit_checksums'  # our key in that custom metadata
_DAMAGED = '.damaged'  # suffix of a step directory set aside; not a step name to Orbax


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
def reading(step: int, path: str) -> Iterator[None]:
  """Turns a failed read of `step` (reading `path`) into DamagedCheckpoint; bugs pass."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    damage = _damage(step, e, path)
    if damage is None:
      raise
    raise damage from e


def saved_checksums(step: int, step_dir: str) -> Optional[dict[str, list[int]]]:
  """The checksums recorded with a step; None for a step saved before they existed. A missing or
  unreadable metadata file is damage (Orbax itself reads it leniently: it only logs)."""
  path = os.path.join(step_dir, STEP_METADATA)
  with reading(step, path):
    with fileio.open_file(path) as f:
      metadata = json.load(f)
  return (metadata.get('custom_metadata') or {}).get(CHECKSUMS_KEY)


def verify(step: int, step_dir: str, tree: PyTree,
           saved: Optional[Mapping[str, list[int]]]) -> None:
  """Raises DamagedCheckpoint unless `tree`'s arrays have the checksums saved for them."""
  if saved is None:
    return
  differ = [key for key, sums in checksums(tree).items() if saved.get(key, sums) != sums]
  if differ:
    raise DamagedCheckpoint(step, os.path.join(step_dir, ITEM),
                            f'the bytes of {listed(differ)} differ from the checksums saved '
                            'with them')


def agreed(ok: bool) -> bool:
  """Whether every process found `ok` (a file may be damaged for one host's reads only): all
  processes then take the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def set_aside(directory: str, step: int) -> str:
  """Renames step directory `step` to `<step>.damaged` (or `.damaged-2`, ...): kept, but no
  longer a step name to Orbax (its steps are integer names) nor to `training_checkpoint_root`."""
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
