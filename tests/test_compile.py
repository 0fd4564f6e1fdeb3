"""python -m segvit_jax.aot.compile: TPU programs compiled on this CPU host, and what it reports.

The command-line tests compile the tiny synthetic config (tests/tiny_runs.py) for a v5e 2x2 slice
(v5litepod-4) and for simulated CPU devices. TPU targets need libtpu importable in the compiling
process: `libtpu_env` puts it on PYTHONPATH from $LIBTPU_DIR (default: .libtpu in the
repository, where `make test` installs requirements-tpu.txt).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from segvit_jax.aot import flops
from segvit_jax.aot import max_batch
from segvit_jax.aot import report
from segvit_jax.aot import targets
from segvit_jax.errors import UserError
from segvit_jax.models import tpu_dropout_attention

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

STEP_KEYS = {'compile_s', 'argument_gib', 'temp_gib', 'total_gib', 'fits', 'flops', 'bytes',
             'hbm_bytes', 'roofline_step_s', 'roofline_mfu', 'kernels'}


def libtpu_env() -> dict:
  """tiny_runs' subprocess environment, with libtpu importable.

  ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes /tmp/libtpu_lockfile, and a second process
  compiling for a TPU at the same time (another test, another user) fails to load it.
  """
  env = dict(tiny_runs.env(1), ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  if importlib.util.find_spec('libtpu') is None:
    directory = os.environ.get('LIBTPU_DIR', os.path.join(tiny_runs.ROOT, '.libtpu'))
    if not os.path.isdir(os.path.join(directory, 'libtpu')):
      raise AssertionError(
          f'libtpu is not importable and not in {directory}: run `make test`, or pip install '
          f'--target={directory} -r requirements-tpu.txt (or set LIBTPU_DIR).')
    env['PYTHONPATH'] = directory + os.pathsep + env['PYTHONPATH']
  return env


def _compile(*flags, topology='v5litepod-4'):
  overrides = [tiny_runs.flag(k, v) for k, v in tiny_runs.TINY.items()]
  cmd = [sys.executable, '-m', 'segvit_jax.aot.compile',
         f'--config={tiny_runs.ROOT}/configs/synthetic.py', *overrides, *flags,
         f'--topology={topology}']
  return subprocess.run(cmd, cwd=tiny_runs.ROOT, env=libtpu_env(), capture_output=True,
                        text=True, timeout=1200)


@pytest.fixture(scope='session')
def tiny_tpu():
  result = _compile('--json')
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout)


def test_tiny_config_compiles_for_a_tpu_slice(tiny_tpu):
  r = tiny_tpu
  assert (r['topology'], r['chips'], r['processes'], r['hbm_gib']) == ('v5litepod-4', 4, 1, 16)
  assert r['device_kind'] == 'TPU v5 lite'
  assert r['mesh'] == {'data': 4, 'fsdp': 1, 'model': 1}
  assert r['peak_flops_per_s'] == 197e12 and r['hbm_bytes_per_s'] == 819e9
  assert isinstance(r['attention'], str) and r['attention']
  assert (r['train']['batch_size'], r['train']['batch_per_shard']) == (8, 2)
  assert (r['eval']['batch_size'], r['eval']['batch_per_shard']) == (4, 1)
  for name in ('train', 'eval'):
    step = r[name]
    assert STEP_KEYS <= set(step), name
    assert step['fits'] is True
    assert step['compile_s'] > 0 and step['flops'] > 0 and 0 < step['hbm_bytes'] <= step['bytes']
    assert 0 < step['argument_gib'] <= step['total_gib'] < r['usable_hbm_gib']
    assert 0 < step['roofline_mfu'] <= 1
    # The bound is the larger of the compute and the memory time.
    compute = max(step['flops'], step['model_flops']) / r['peak_flops_per_s']
    memory = step['hbm_bytes'] / r['hbm_bytes_per_s']
    assert step['roofline_step_s'] == pytest.approx(max(compute, memory))
    assert step['roofline_mfu'] == pytest.approx(
        step['model_flops'] / r['peak_flops_per_s'] / step['roofline_step_s'])
  # The train step does forward and backward passes: about 3x the model's forward FLOPs.
  assert r['train']['flops'] > 2 * r['train']['model_flops'] / 3


def test_pallas_attention_kernel_is_in_the_tpu_programs(tiny_tpu):
  # On TPU the ViT blocks and the decoders' self-attention use the Pallas flash kernel: a
  # Mosaic custom call in the compiled train and eval programs.
  assert 'tpu_custom_call' in tiny_tpu['train']['custom_calls'], tiny_tpu['attention']
  assert 'tpu_custom_call' in tiny_tpu['eval']['custom_calls'], tiny_tpu['attention']
  # The decoders' attention with dropout (training only): our kernel, forward and backward.
  ours = {tpu_dropout_attention.FORWARD_NAME, tpu_dropout_attention.BACKWARD_NAME}
  assert ours <= set(tiny_tpu['train']['kernels']), tiny_tpu['train']['kernels']
  assert not ours & set(tiny_tpu['eval']['kernels']), tiny_tpu['eval']['kernels']
  assert len(tiny_tpu['eval']['kernels']) >= 1


def test_a_step_that_does_not_fit_exits_1_naming_what_to_change():
  # A 4-block ViT of width 8192: 3.2 G parameters, stored with their AdamW moments split over
  # config.mesh data:4 (36 / 4 GiB): 9 GiB of state per chip, more than half a v5e chip's
  # 15.75 GiB, and the step more than all of it.
  result = _compile('--config.model.embed_dim=8192', '--config.model.num_heads=8',
                    '--config.model.depth=4', '--config.model.out_indices=(1, 3)',
                    '--train_only')
  assert result.returncode == 1, result.stderr[-4000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: the train step does not fit in the 15.75 GiB a v5e chip '
                         'offers: the parameters and optimizer state alone take 9.0'), last
  assert "per chip on config.mesh='data:4'; shard them over the chips with an fsdp axis" in last
  assert 'Traceback' not in result.stderr
  assert 'does not fit' in result.stdout.lower()


def test_does_not_fit_names_the_batch_when_the_state_is_small():
  step = {'fits': False, 'total_gib': 20.5, 'batch_size': 64, 'batch_per_shard': 16,
          'state_gib': 1.5}
  result = {'train': step, 'eval': dict(step, fits=True), 'usable_hbm_gib': 15.75,
            'mesh': {'data': 4, 'fsdp': 1, 'model': 1}}
  assert report.does_not_fit(result, targets.CHIPS['v5litepod']) == (
      'the train step needs 20.50 GiB per chip, more than the 15.75 GiB a v5e chip offers (batch '
      '64, 16 per data shard): lower config.batch_size (--find_max_batch finds the largest), or '
      'set config.model.remat=True or config.optim.grad_accum_steps, or use more chips.')
  result['train'] = dict(step, fits=True)
  result['eval'] = dict(step, total_gib=None)
  assert report.does_not_fit(result, targets.CHIPS['v4']).startswith(
      'the eval step needs more per chip, more than the 30.75 GiB a v4 chip offers (batch 64, '
      '16 per data shard): lower config.eval.batch_size or config.dataset.eval_pad_size')
  result['eval']['fits'] = True
  assert report.does_not_fit(result, targets.CHIPS['v4']) is None


def test_a_batch_that_does_not_divide_stops_before_compiling():
  result = _compile('--config.batch_size=6')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.batch_size=6 does not divide over data x fsdp = 4 devices: use 4 or 8.')
  assert 'compiling' not in result.stderr


def test_cpu_devices_as_target():
  result = _compile('--json', topology='cpu:2')
  assert result.returncode == 0, result.stderr[-4000:]
  r = json.loads(result.stdout)
  assert (r['chips'], r['mesh']['data'], r['hbm_gib'], r['peak_flops_per_s']) == (2, 2, None, None)
  for name in ('train', 'eval'):
    assert r[name]['fits'] is True and r[name]['flops'] > 0 and r[name]['bytes'] > 0
    assert r[name]['roofline_step_s'] is None and r[name]['roofline_mfu'] is None


@pytest.mark.parametrize('name,topology,chips,processes,bounds', [
    ('v4-8', 'v4:2x2x1', 4, 1, (2, 2, 1)),
    ('v4-16', 'v4:2x2x2', 8, 2, (2, 2, 1)),
    ('v4-32', 'v4:2x2x4', 16, 4, (2, 2, 1)),
    ('v4-128', 'v4:4x4x4', 64, 16, (2, 2, 1)),
    ('v5p-8', 'v5p:2x2x1', 4, 1, (2, 2, 1)),
    ('v5p-64', 'v5p:2x4x4', 32, 8, (2, 2, 1)),
    ('v5litepod-1', 'v5e:1x1', 1, 1, (1, 1, 1)),
    ('v5litepod-4', 'v5e:2x2', 4, 1, (2, 2, 1)),
    ('v5litepod-8', 'v5e:2x4', 8, 1, (2, 4, 1)),
    ('v5litepod-16', 'v5e:4x4', 16, 4, (2, 2, 1)),
    ('v5litepod-256', 'v5e:16x16', 256, 64, (2, 2, 1)),
    ('v6e-8', 'v6e:2x4', 8, 1, (2, 4, 1)),
    ('v6e-32', 'v6e:4x8', 32, 8, (2, 2, 1)),
    ('V5E-4', 'v5e:2x2', 4, 1, (2, 2, 1)),
    ('v5e:4x4', 'v5e:4x4', 16, 4, (2, 2, 1)),
    ('v4:2x2x4', 'v4:2x2x4', 16, 4, (2, 2, 1)),
])
def test_topology_names(name, topology, chips, processes, bounds):
  target = targets.parse_topology(name)
  assert (target.topology, target.chips, target.processes, target.host_bounds) == (
      topology, chips, processes, bounds)
  family = {'v4': 'v4', 'v5p': 'v5p', 'v5e': 'v5litepod', 'v6e': 'v6e'}[topology.split(':')[0]]
  assert target.chip == targets.CHIPS[family]


def test_cpu_topology():
  target = targets.parse_topology('cpu:8')
  assert (target.chips, target.processes, target.chip) == (8, 1, None)


@pytest.mark.parametrize('name,message', [
    ('v4-6', "'v4-6' is not a v4 slice: use v4-8, v4-16"),
    ('v4-7', "'v4-7' is not a v4 slice"),
    ('v5litepod-2', "'v5litepod-2' is not a v5litepod slice: use v5litepod-1, v5litepod-4"),
    ('v3-8', "'v3-8' is not a TPU type"),
    ('tpu', "'tpu' is not a TPU type"),
    ('cpu:0', 'cpu:N wants a positive device count'),
    ('v5e:4x4x1', 'v5e slices have 2 dimensions'),
])
def test_topology_errors(name, message):
  with pytest.raises(UserError, match=message):
    targets.parse_topology(name)


def test_published_chip_figures():
  # cloud.google.com/tpu/docs: per-chip bf16 peak, HBM capacity and bandwidth.
  figures = {name: (c.peak_flops, c.hbm_gib, c.hbm_bytes_per_s)
             for name, c in targets.CHIPS.items()}
  assert figures == {'v4': (275e12, 32, 1200e9), 'v5litepod': (197e12, 16, 819e9),
                     'v5p': (459e12, 95, 2765e9), 'v6e': (918e12, 32, 1638e9)}


# ---------------------------------------------------------------------------------------------
# The largest batch, with a stand-in for compiling.


@pytest.mark.parametrize('start,limit_gib,want', [(2, 16.0, 14), (16, 16.0, 14), (1, 4.0, 2),
                                                  (40, 16.0, 14), (2, 0.5, 0)])
def test_max_batch_search_is_economical(start, limit_gib, want):
  compiled = []

  def measure(b):  # 1 GiB + 1 GiB per example, and a little curvature
    compiled.append(b)
    total = 1.0 + b + 0.001 * b * b
    return total, total <= limit_gib

  best, log = max_batch.search_max_batch(measure, start, measure(start), limit_gib)
  assert best == want
  assert sorted(log) == sorted(compiled)
  assert len(compiled) <= 5


def test_max_batch_without_totals_for_what_does_not_fit():
  def measure(b):  # the compiler gave no total for programs that do not fit
    total = 1.0 + b
    return (total, True) if total <= 16.0 else (None, False)

  best, log = max_batch.search_max_batch(measure, 40, measure(40), 16.0)
  assert best == 15 and len(log) <= 8


def test_max_batch_respects_the_accumulation_unit():
  def measure(b):
    return 1.0 + b, 1.0 + b <= 16.0

  best, log = max_batch.search_max_batch(measure, 4, measure(4), 16.0, unit=4)
  assert best == 12 and all(b % 4 == 0 for b in log)


# ---------------------------------------------------------------------------------------------
# Model FLOPs.


def test_eval_model_calls_cover_every_window():
  from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.get_base_config()  # ADE20K: 2048 bucket, 640 crops, stride 608
  assert flops.eval_forwards(config) == [((640, 640), 16)]
  config.eval.mode = 'whole'
  assert flops.eval_forwards(config) == [((2048, 2048), 1)]
  config.eval.mode = 'slide'
  config.eval.multi_scale = True
  forwards = flops.eval_forwards(config)
  assert len(forwards) == 6 and all(hw == (640, 640) for hw, _ in forwards)
  assert forwards[2] == ((640, 640), 2 * 16)  # ratio 1, with its flip


def test_train_model_flops_are_three_forward_passes():
  from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.get_base_config()
  train, evaluation = flops.model_flops_per_chip(config, 16, train_batch=16, eval_batch=8)
  breakdown = flops.model_flops(config.model)
  fvcore = flops.total_flops(breakdown)  # multiply-adds count once there
  forward = 2 * flops.total_flops(breakdown, ('matmul',)) + (
      flops.total_flops(breakdown, ('norm', 'upsample')))
  assert 1.9 * fvcore < forward < 2 * fvcore
  assert evaluation == pytest.approx(16 * forward * 8 / 16)
  # The train forward stops at the mask logits; the rest is 3 passes over the same layers.
  assert 0.95 * 3 * forward < train < 3 * forward
