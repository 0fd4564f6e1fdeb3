"""Set-up of every test process and shared helpers.

Before JAX starts in a test process: 8 simulated CPU devices (meshes run in-process), quiet
TensorFlow, and a persistent compilation cache per test worker, so that the same tiny programs
compile once across tests and the subprocesses they start. Subprocesses inherit all of it
(`subprocess_env`), so in-process and subprocess runs compile the same programs and compare bit
for bit.

Test processes compile for speed of compilation, not of the program: LLVM at -O0
(`--xla_backend_optimization_level=0`), XLA:CPU's older loop emitters instead of its fusion
emitters (`--xla_cpu_use_fusion_emitters=false`, where XLA still has them: jaxlib < 0.11, whose
XLA rejects the flag as unknown) and its default scheduler instead of the
concurrency-optimised one. On the tiny programs that dominate the suite each halves the compile
time (a Shrunk value-and-grad: 7.0 s -> 3.1 s for the last two), and the programs run as fast.
Results compared between two runs (resumes, meshes, hosts) come from the same flags on both sides;
a test that pins float bits against an outside reference (PyTorch's bilinear weights) compiles
with the product's options explicitly (`PRODUCT_COMPILER_OPTIONS`), because these can change a
last bit.

Helpers are fixtures (`repo_root`, `subprocess_env`, `run_cli`) and, for values needed at import
time, module attributes: `from conftest import ROOT`.
"""

import atexit
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _xla_has_loop_emitters() -> bool:
  """XLA:CPU's loop emitters are gone from jaxlib 0.11 on, and with them the flag that picks
  them, which that XLA rejects (an unknown XLA_FLAGS entry is fatal, an unknown compile option an
  error). Read from the metadata: jax must not start before XLA_FLAGS is set."""
  major, minor = (int(x) for x in importlib.metadata.version('jaxlib').split('.')[:2])
  return (major, minor) < (0, 11)


_LOOP_EMITTERS = _xla_has_loop_emitters()

# What users' programs compile with (XLA's default), for `jit(...).lower(...).compile(...)`.
PRODUCT_COMPILER_OPTIONS = {
    'xla_backend_optimization_level': 2,
    'xla_cpu_enable_concurrency_optimized_scheduler': True,
    **({'xla_cpu_use_fusion_emitters': True} if _LOOP_EMITTERS else {}),
}


# XLA:CPU options of every test process, unless XLA_FLAGS sets them: see the module docstring.
_TEST_COMPILER_FLAGS = {
    'xla_backend_optimization_level': '0',
    'xla_cpu_enable_concurrency_optimized_scheduler': 'false',
    **({'xla_cpu_use_fusion_emitters': 'false'} if _LOOP_EMITTERS else {}),
}


def _xla_flags(flags: str, num_devices: int) -> str:
  kept = [f for f in flags.split() if 'device_count' not in f]
  for name, value in _TEST_COMPILER_FLAGS.items():
    if not any(f.lstrip('-').split('=')[0] == name for f in kept):
      kept.append(f'--{name}={value}')
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={num_devices}'])


_CACHE_OWNER = 'SEGVIT_TEST_CACHE_OWNER'
_SCRATCH_OWNER = 'SEGVIT_TEST_SCRATCH_OWNER'


def _set_environment() -> None:
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # as segvit_jax.cli sets it
  os.environ['XLA_FLAGS'] = _xla_flags(os.environ.get('XLA_FLAGS', ''), 8)
  # One scratch folder for everything the run writes to the temporary directory (pytest's
  # tmp_path, the caches below, TensorFlow autograph's generated modules, which it never
  # removes), made by the first process of the run and removed when it exits; workers and
  # subprocesses inherit it through TMPDIR.
  if _SCRATCH_OWNER not in os.environ:
    scratch = tempfile.mkdtemp(prefix='segvit_tests_')
    os.environ[_SCRATCH_OWNER] = str(os.getpid())
    os.environ['TMPDIR'] = scratch
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
  tempfile.tempdir = os.environ['TMPDIR']
  # libtpu (TPU compiles) logs to /tmp/tpu_logs unless told otherwise.
  os.environ.setdefault('TPU_LOG_DIR', os.path.join(os.environ['TMPDIR'], 'tpu_logs'))
  # One cache per test worker, shared with the subprocesses it starts: pytest-xdist's workers
  # inherit the controller's environment, and JAX writes cache entries in place, so a cache
  # shared by workers that compile at once can be read half-written.
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  if os.environ.get(_CACHE_OWNER) != worker or 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    cache = tempfile.mkdtemp(prefix=f'segvit_cache_{worker}_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
    os.environ[_CACHE_OWNER] = worker
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'


_set_environment()


def subprocess_env(num_devices=1, pythonpath=None, **variables):
  """os.environ (this process's set-up) for a child Python on `num_devices` CPU devices.

  Args:
    num_devices: CPU devices XLA simulates (fixed when JAX starts, hence subprocesses).
    pythonpath: the child's whole sys.path prefix; default the repository root before the
      inherited PYTHONPATH.
    **variables: further environment variables (str values).
  """
  env = dict(os.environ)
  if pythonpath is None:
    pythonpath = [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
  env['PYTHONPATH'] = os.pathsep.join(pythonpath)
  env['XLA_FLAGS'] = _xla_flags(env.get('XLA_FLAGS', ''), num_devices)
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


# Session scope: a pytest-xdist worker may run other modules' tests between a module's, and a
# module-scoped fixture would be set up again after each switch. Here, for every module that
# compares a run with an uninterrupted one.
@pytest.fixture(name='reference', scope='session')
def reference_fixture(tmp_path_factory):
  """(workdir, result) of an uninterrupted tiny run (tests/tiny_runs.py) on one device: 6 steps,
  checkpoints at 3 and 6, evaluated at the end, predictions drawn. Copy it before changing it."""
  import jax  # pylint: disable=g-import-not-at-top
  import tiny_runs  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('reference')
  config = tiny_runs.tiny_config(evals__val__every_steps=6, evals__figure__every_steps=-1,
                                 evals__figure__num_images=2)
  result = loop.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return str(workdir), result


def pytest_collection_modifyitems(config, items):
  """The tests marked slow first (in their collection order), the rest after: started last, a
  long test would keep one pytest worker busy while the other has nothing left to run."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
