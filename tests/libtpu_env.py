"""Where tests find libtpu, to compile for TPU topologies on a host without TPUs.

libtpu is never imported by the test process itself: with libtpu importable, JAX tries to bring
up a TPU backend at start-up (slow, with warnings about TPU_ACCELERATOR_TYPE). Tests that
compile for a TPU run a subprocess with `subprocess_env()`: JAX_PLATFORMS=cpu keeps its own
computations on CPU, and libtpu is loaded only when a topology is asked for.

libtpu is taken from the test interpreter's own packages when it has it (e.g. the
requirements-tpu file installed into the venv), else from the directory in $SEGVIT_LIBTPU_DIR
(default /work/libtpu), which holds the `libtpu` package:
    pip install --target=DIR "libtpu==0.0.42.*"
"""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_DIR_VARIABLE = 'SEGVIT_LIBTPU_DIR'
DEFAULT_LIBTPU_DIR = '/work/libtpu'


def libtpu_dir():
  """The directory to put on PYTHONPATH for libtpu; None when it is importable already."""
  if importlib.util.find_spec('libtpu') is not None:
    return None
  path = os.environ.get(LIBTPU_DIR_VARIABLE, DEFAULT_LIBTPU_DIR)
  if not os.path.isdir(os.path.join(path, 'libtpu')):
    raise FileNotFoundError(
        f'libtpu is not importable and ${LIBTPU_DIR_VARIABLE}={path!r} has no libtpu package; '
        f'pip install --target={path} "libtpu==0.0.42.*" or point ${LIBTPU_DIR_VARIABLE} at one.')
  return path


def subprocess_env():
  """os.environ for a subprocess that sees this repository and libtpu, with JAX on CPU.

  ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes /tmp/libtpu_lockfile, and a second process
  compiling at the same time (parallel tests, another user) fails to load it.
  """
  paths = [REPO, libtpu_dir(), os.environ.get('PYTHONPATH')]
  return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), JAX_PLATFORMS='cpu',
              ALLOW_MULTIPLE_LIBTPU_LOAD='1')
