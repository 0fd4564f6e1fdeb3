"""Outside the data layer nothing needs TensorFlow: where tensorflow and tensorflow_datasets are not
installed (GPU machines, minimal environments), the trainer on the synthetic source, prediction,
the converter, compiling, the summary and the benchmarks work, and a file source stops with one
line naming what to install.

"Not installed" is made for real in a child process: a folder first on its path holds packages
`tensorflow` and `tensorflow_datasets` whose import fails as a missing module's does.
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import tiny_runs

# The modules that must not import TensorFlow (everything but the data layer: tf_pipeline,
# augment, sources.tfds_builder / mmseg_folder / reader).
TF_FREE = ['segvit_jax.main', 'segvit_jax.training.loop', 'segvit_jax.training.eval_mode',
           'segvit_jax.predict', 'segvit_jax.convert.checkpoints',
           'segvit_jax.aot.compile', 'segvit_jax.aot.summary', 'segvit_jax.config',
           'segvit_jax.checkpoint.training_checkpoints', 'segvit_jax.checkpoint.parameters',
           'segvit_jax.evaluation.evaluators', 'segvit_jax.data.input_pipeline', 'segvit_jax.data.numpy_pipeline',
           'segvit_jax.data.datasets', 'segvit_jax.data.datasets.ade20k', 'segvit_jax.data.palettes',
           'segvit_jax.data.sources', 'segvit_jax.data.sources.checks', 'segvit_jax.data.prepare',
           'segvit_jax.training.tensorboard_events', 'bench.throughput', 'bench.gpu_check']


@pytest.fixture(name='no_tensorflow', scope='module')
def no_tensorflow_fixture(tmp_path_factory, subprocess_env):
  """A child environment in which `import tensorflow` / `tensorflow_datasets` fail."""
  blocker = tmp_path_factory.mktemp('no_tensorflow')
  for name in ('tensorflow', 'tensorflow_datasets'):
    (blocker / name).mkdir()
    (blocker / name / '__init__.py').write_text(
        f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  return subprocess_env(pythonpath=[str(blocker), ROOT])


def _run(env, *args, timeout=300):
  return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_modules_outside_the_data_layer_do_not_import_tensorflow(subprocess_env):
  """In the full environment (TensorFlow installed), importing them leaves it unloaded."""
  script = ('import importlib, sys\n'
            f'for name in {TF_FREE!r}:\n'
            '  importlib.import_module(name)\n'
            '  assert "tensorflow" not in sys.modules, name\n'
            'print("ok")\n')
  proc = _run(subprocess_env(), '-c', script)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]


def test_the_blocker_blocks(no_tensorflow):
  proc = _run(no_tensorflow, '-c', 'import tensorflow')
  assert "ModuleNotFoundError: No module named 'tensorflow'" in proc.stderr


def test_synthetic_run_trains_evaluates_checkpoints_draws_and_predicts(no_tensorflow, tmp_path):
  workdir = tmp_path / 'run'
  cmd = tiny_runs.main_cmd(workdir, **{'evals.val.every_steps': 6,
                                       'evals.figure.every_steps': 6})
  proc = _run(no_tensorflow, *cmd[1:], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Validation: mIoU' in proc.stdout and 'Predictions:' in proc.stdout, proc.stdout
  assert tiny_runs.steps(workdir) == [3, 6]
  assert (workdir / 'predictions.png').is_file()
  with open(workdir / 'final_metrics.json', encoding='utf-8') as f:
    assert 0.0 <= json.load(f)['miou'] <= 1.0
  assert sorted(tiny_runs.losses(workdir)) == [1, 2, 3, 4, 5, 6]

  image = tmp_path / 'photo.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(image)
  out = tmp_path / 'out'
  proc = _run(no_tensorflow, '-m', 'segvit_jax.predict', f'--checkpoint={workdir}', image,
              f'--output={out}', '--noprogress')
  assert proc.returncode == 0, proc.stderr[-3000:]
  labels = np.asarray(Image.open(out / 'labels' / 'photo.png'))
  assert labels.shape == (40, 56) and labels.max() < 3


def test_a_file_source_says_what_to_install(no_tensorflow, tmp_path):
  workdir = tmp_path / 'run'
  cmd = tiny_runs.main_cmd(workdir, **{'dataset.source': 'tfds'})
  proc = _run(no_tensorflow, *cmd[1:])
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: config.dataset.source='tfds' (read with tf.data; source 'synthetic' is not) needs "
      'tensorflow, which is not installed: pip install tensorflow-cpu tensorflow-datasets'
  ], proc.stderr
  assert not workdir.exists()
