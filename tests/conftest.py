"""Set-up of every test process, before JAX starts: 8 simulated CPU devices (meshes run
in-process), quiet TensorFlow, and a persistent compilation cache per test worker (the same tiny
programs compile once across tests and the subprocesses they start)."""

import os
import tempfile

_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')


def _set_environment() -> None:
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  # XLA:CPU spends most of a tiny model's compile in LLVM; these cut it about 3x. Every test
  # and every subprocess it starts use the same flags, so results compare as with the defaults.
  flags += [f for f in _FAST_COMPILE if f not in flags]
  flags.append('--xla_force_host_platform_device_count=8')
  os.environ['XLA_FLAGS'] = ' '.join(flags)
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix=f'segvit_jax_cache_{worker}_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'


_set_environment()
