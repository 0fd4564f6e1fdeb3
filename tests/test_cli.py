"""Bad command lines of the real commands: one `error: ...` line naming what is wrong and what
would work, exit 1, no traceback, nothing left behind; checked before anything compiles."""

import os

import pytest

MAIN = 'segvit_jax.main'
PREDICT = 'segvit_jax.predict'


def _error_line(proc) -> str:
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


@pytest.fixture(name='synthetic')
def synthetic_fixture(repo_root):
  return '--config=' + os.path.join(repo_root, 'configs', 'synthetic.py')


def test_config_key_typo_names_the_key_and_the_likely_one(run_cli, synthetic, tmp_path):
  workdir = tmp_path / 'run'
  line = _error_line(run_cli(MAIN, synthetic, f'--workdir={workdir}', '--config.batch_sze=4'))
  assert 'batch_sze' in line and 'batch_size' in line, line
  assert not workdir.exists()


def test_missing_config_file_is_named(run_cli, tmp_path):
  missing = tmp_path / 'nope.py'
  line = _error_line(run_cli(MAIN, f'--config={missing}', f'--workdir={tmp_path / "run"}'))
  assert str(missing) in line, line


def test_a_mesh_that_does_not_fit_the_devices(run_cli, synthetic, tmp_path, subprocess_env):
  proc = run_cli(MAIN, synthetic, f'--workdir={tmp_path / "run"}', '--config.mesh=data:3',
                 env=subprocess_env(num_devices=4))
  line = _error_line(proc)
  assert 'config.mesh' in line and '4' in line, line
  assert not (tmp_path / 'run').exists()


def test_a_batch_that_does_not_divide_names_values_that_work(run_cli, synthetic, tmp_path,
                                                             subprocess_env):
  proc = run_cli(MAIN, synthetic, f'--workdir={tmp_path / "run"}', '--config.batch_size=6',
                 '--config.mesh=data:4', env=subprocess_env(num_devices=4))
  assert _error_line(proc) == ('error: config.batch_size=6 does not divide over data x fsdp = 4 '
                               'devices: use 4 or 8.')
  assert 'parameters' not in proc.stdout  # stopped before the model was built
  assert not (tmp_path / 'run').exists()


def test_a_workdir_that_is_a_file(run_cli, synthetic, tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  line = _error_line(run_cli(MAIN, synthetic, f'--workdir={path}'))
  assert line == f'error: --workdir={path} is a file; give a directory.'


def test_predict_needs_its_output(run_cli, tmp_path):
  line = _error_line(run_cli(PREDICT, f'--checkpoint={tmp_path}', str(tmp_path)))
  assert line.startswith('error: --output=OUT is required: python -m segvit_jax.predict'), line


def test_predict_on_a_missing_input(run_cli, tmp_path):
  missing = tmp_path / 'photos'
  line = _error_line(run_cli(PREDICT, f'--checkpoint={tmp_path}', f'--output={tmp_path / "o"}',
                             str(missing)))
  assert str(missing) in line, line


def test_predict_on_an_official_checkpoint_suggests_convert(run_cli, tmp_path):
  (tmp_path / 'photo.png').write_bytes(b'')
  pth = tmp_path / 'ade.pth'
  pth.write_bytes(b'not really')
  line = _error_line(run_cli(PREDICT, f'--checkpoint={pth}', f'--output={tmp_path / "o"}',
                             str(tmp_path / 'photo.png')))
  assert 'python -m segvit_jax.convert' in line and str(pth) in line, line


def test_predict_output_that_is_a_file(run_cli, tmp_path):
  out = tmp_path / 'out'
  out.write_text('x')
  line = _error_line(run_cli(PREDICT, f'--checkpoint={tmp_path}', f'--output={out}',
                             str(tmp_path)))
  assert line == f'error: --output={out} is a file; give a directory.'
