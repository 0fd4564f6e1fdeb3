"""Shared test helpers: the repository root, the environment of a subprocess, a CLI runner.

Each is a fixture (`repo_root`, `subprocess_env`, `run_cli`) and, for values needed at import
time (module constants, `pytest.mark.parametrize`), a module attribute: `from conftest import ROOT`.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(num_devices=1, pythonpath=None, fast_compile=False, **variables):
  """os.environ for a child Python on `num_devices` simulated CPU devices.

  Args:
    num_devices: CPU devices XLA simulates (must be set before JAX starts, hence subprocesses).
    pythonpath: the child's whole sys.path prefix; default the repository root before the
      inherited PYTHONPATH.
    fast_compile: XLA:CPU flags that cut a tiny model's compile time about 3x (LLVM passes off).
    **variables: further environment variables (str values).
  """
  env = dict(os.environ)
  if pythonpath is None:
    pythonpath = [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
  env['PYTHONPATH'] = os.pathsep.join(pythonpath)
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'  # TensorFlow's start-up banners
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  flags.append(f'--xla_force_host_platform_device_count={num_devices}')
  if fast_compile:
    flags += ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
  env['XLA_FLAGS'] = ' '.join(flags)
  env.update(variables)
  return env


def run_cli(module, *args, env=None, cwd=ROOT, timeout=600, check=False):
  """`python -m MODULE ARGS...` (args str()-ed) in `env` (default `subprocess_env()`).

  With check=True, asserts exit status 0 and shows the end of stderr otherwise.
  """
  proc = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=cwd,
                        env=subprocess_env() if env is None else env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(name='repo_root', scope='session')
def repo_root_fixture():
  """The repository root (absolute path)."""
  return ROOT


@pytest.fixture(name='subprocess_env', scope='session')
def subprocess_env_fixture():
  """The function `subprocess_env`: subprocess_env(num_devices=8) for an 8-device child."""
  return subprocess_env


@pytest.fixture(name='run_cli', scope='session')
def run_cli_fixture():
  """The function `run_cli`: run_cli('segvit_jax.predict', '--help')."""
  return run_cli
