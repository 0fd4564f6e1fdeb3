"""The whole-config checks: each failure's one-line message, and what is made to work instead."""

import subprocess
import sys

import pytest

from segvit_jax.training import preflight
from segvit_jax.errors import UserError

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top


_config = tiny_runs.tiny_config  # configs/synthetic.py, the tiny overrides, then the test's


def _error(config, num_devices=4, process_count=1) -> str:
  with pytest.raises(UserError) as error:
    preflight.check(config, num_devices=num_devices, process_count=process_count)
  message = str(error.value)
  assert '\n' not in message
  return message


def test_a_config_that_works_gives_its_layout():
  plan = preflight.check(_config(batch_size=16, mesh='data:2,fsdp:2,model:2',
                                 eval__batch_size=20, optim__grad_accum_steps=2),
                         num_devices=8, process_count=2)
  assert plan.mesh == {'data': 2, 'fsdp': 2, 'model': 2}
  assert plan.batch_shards == 4
  assert plan.train_batch_per_shard == 4 and plan.micro_batch_per_shard == 2
  assert plan.eval_batch_size == 20 and plan.eval_batch_per_shard == 5


def test_eval_batch_is_rounded_up_not_refused():
  # configs/synthetic.py on data:8 (eval batch 20) and the README's TPU example (eval batch 8
  # on 16 chips, 4 hosts): both run, on batches of 24 and 16.
  plan = preflight.check(_config(batch_size=8, eval__batch_size=20), num_devices=8)
  assert (plan.eval_batch_size, plan.eval_batch_per_shard) == (24, 3)
  plan = preflight.check(_config(batch_size=16, eval__batch_size=8), num_devices=16,
                         process_count=4)
  assert (plan.eval_batch_size, plan.eval_batch_per_shard) == (16, 1)


def test_batch_size_that_does_not_divide():
  assert _error(_config(batch_size=6)) == (
      'config.batch_size=6 does not divide over data x fsdp = 4 devices: use 4 or 8.')
  assert _error(_config(batch_size=2)) == (
      'config.batch_size=2 does not divide over data x fsdp = 4 devices: use 4.')
  # The model axis does not split the batch.
  assert 'data x fsdp = 2 devices: use 2 or 4' in _error(
      _config(batch_size=3, mesh='data:2,model:2'))


def test_batch_with_gradient_accumulation():
  assert _error(_config(batch_size=8, optim__grad_accum_steps=3)) == (
      'config.optim.grad_accum_steps=3 does not divide config.batch_size=8: use a divisor of '
      '8, or config.batch_size=12.')
  assert _error(_config(batch_size=8, optim__grad_accum_steps=4)) == (
      'config.batch_size=8 / config.optim.grad_accum_steps=4 = 2 does not divide over data x '
      'fsdp = 4 devices: use config.batch_size=16.')
  assert 'grad_accum_steps=0 must be >= 1' in _error(_config(optim__grad_accum_steps=0))


def test_batch_shards_shared_by_processes():
  message = _error(_config(batch_size=8, mesh='data:2,model:4'), num_devices=8,
                   process_count=4)
  assert message.startswith("config.mesh='data:2,model:4' splits the batch over data x fsdp = "
                            '2 devices, which 4 processes cannot share out')


def test_mesh_that_does_not_fit_the_devices():
  assert _error(_config(mesh='data:3')) == (
      "config.mesh='data:3': uses 3 devices but 4 are available; use -1 for one axis to take "
      "the rest (e.g. 'data:-1').")


def test_eval_batch_must_be_positive():
  assert _error(_config(eval__batch_size=0)) == 'config.eval.batch_size=0 must be positive.'


def test_class_counts():
  assert _error(_config(model__num_classes=4)) == (
      'config.model.num_classes=4 differs from config.dataset.num_classes=3: set both to the '
      'number of classes of the dataset.')


def test_model_config_errors_are_user_errors():
  message = _error(_config(model__num_heads=3))
  assert message.startswith('config.model.num_heads:') and 'not divisible' in message


def test_crops_against_the_patch_size():
  assert _error(_config(dataset__crop_size=(36, 36))) == (
      'config.dataset.crop_size=(36, 36) is not a multiple of config.model.patch_size=8: use '
      '(32, 32) or (40, 40).')
  assert _error(_config(dataset__eval_pad_size=(30, 32))) == (
      'config.dataset.eval_pad_size=(30, 32) is not a multiple of config.model.patch_size=8: '
      'use (24, 32) or (32, 32).')
  assert _error(_config(eval__mode='slide', eval__crop_size=(20, 20), eval__stride=(16, 16))) == (
      'config.eval.crop_size=(20, 20) is not a multiple of config.model.patch_size=8: use '
      '(16, 16) or (24, 24).')
  assert _error(_config(dataset__crop_size=(4, 4))) == (
      'config.dataset.crop_size=(4, 4) is not a multiple of config.model.patch_size=8: use '
      '(8, 8).')
  assert _error(_config(dataset__eval_label_pad_size=(32,))) == (
      'config.dataset.eval_label_pad_size=(32,) must be a positive (h, w) pair of integers.')


def test_eval_settings():
  assert _error(_config(eval__mode='sliding')) == (
      "config.eval.mode='sliding': use 'slide' or 'whole'.")
  assert _error(_config(eval__mode='slide', eval__crop_size=(32, 32),
                        eval__stride=(40, 16))) == (
      'config.eval.stride=(40, 16) is larger than config.eval.crop_size=(32, 32): windows would '
      'leave pixels unscored; use a stride of at most (32, 32).')
  assert _error(_config(eval__multi_scale=True, eval__scales=(0.5, -1.0))) == (
      'config.eval.scales=(0.5, -1.0) must be positive ratios, e.g. (1.0,).')


def test_main_stops_before_building_anything(tmp_path):
  """configs/synthetic.py with batch 6 on 4 devices: one line naming config.batch_size."""
  result = subprocess.run(
      [sys.executable, '-m', 'segvit_jax.main', f'--config={tiny_runs.ROOT}/configs/synthetic.py',
       f'--workdir={tmp_path}', '--config.batch_size=6'],
      cwd=tiny_runs.ROOT, env=tiny_runs.env(4), capture_output=True, text=True, timeout=60)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1] == ('error: config.batch_size=6 does not divide over data x fsdp = 4 devices: '
                       'use 4 or 8.'), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
