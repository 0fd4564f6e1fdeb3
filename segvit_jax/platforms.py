"""Which JAX platforms a process starts, where libtpu is installed but no TPU is attached.

With `libtpu` importable (requirements-tpu.txt: on TPU VMs, and wherever TPU programs are compiled
with `segvit_jax.compile`), JAX tries its TPU backend at start-up even on a host without TPU chips:
it loads libtpu, which prints three warnings (no TPU_ACCELERATOR_TYPE, no TPU_WORKER_HOSTNAMES, an
INVALID_ARGUMENT line) and adds about 0.2 s before JAX falls back to the CPU. `skip_absent_tpu()`
spares CPU runs both; TPU hosts and explicit JAX_PLATFORMS choices are left alone.
"""

import glob
import importlib.util
import os

import jax

# Device files of attached accelerators: TPU chips (/dev/accel* on v4 / v5p, /dev/vfio/<n> on
# v5e / v6e), NVIDIA and AMD GPUs. Where any exists, JAX chooses its backends as usual.
_ACCELERATOR_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def skip_absent_tpu() -> None:
  """Starts JAX on the CPU when libtpu is importable but no accelerator is attached.

  Call before the first JAX operation. Does nothing when JAX_PLATFORMS (or jax_platforms) is
  set, when libtpu is not installed, or on a host with a TPU or GPU.
  """
  if os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms:
    return
  if importlib.util.find_spec('libtpu') is None:
    return
  if any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES):
    return
  jax.config.update('jax_platforms', 'cpu')
