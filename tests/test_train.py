"""The trainer end to end at tiny sizes: logging and evaluators, resume after SIGKILL, SIGTERM and
SIGINT, non-finite loss, eval mode, meshes, gradient accumulation and bfloat16.

Runs are in-process (tests/conftest.py gives this process 8 simulated CPU devices) except where a
real process must be signalled or killed; those run `segvit_jax.main` through
tests/run_with_faults.py, and their resumes run in-process again, so the comparisons also check
that a subprocess and this process compute the same bits.
"""

import json
import os
import shutil
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segvit_jax import losses
from segvit_jax.checkpoint import parameters
from segvit_jax.training import build
from segvit_jax.training import eval_mode
from segvit_jax.training import loop
from segvit_jax.training import state as state_lib
from segvit_jax.training import step as step_lib

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

ROOT = tiny_runs.ROOT
ONE_DEVICE = jax.devices()[:1]
TERMS = ('train/loss', 'train/loss_ce', 'train/loss_mask', 'train/loss_dice')


def _train(workdir, devices=ONE_DEVICE, **overrides):
  return loop.train_and_evaluate(tiny_runs.tiny_config(**overrides), str(workdir),
                                 devices=devices)


def _start(workdir, fault, **overrides):
  return subprocess.Popen(tiny_runs.main_cmd(workdir, fault=fault, **overrides), cwd=ROOT,
                          env=tiny_runs.env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _signal_at(workdir, step, signum):
  """A subprocess run stopped by `signum` after step `step`: (exit code, output)."""
  proc = _start(workdir, f'hang_after:{step}')
  try:
    tiny_runs.wait_for(lambda: os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and
                       step in tiny_runs.losses(workdir), proc, 300, f'step {step}')
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out


def test_reference_run_logs_and_evaluates(reference):
  workdir, result = reference
  records = tiny_runs.losses(workdir)
  assert sorted(records) == [1, 2, 3, 4, 5, 6]
  for step, record in records.items():
    for key in (*TERMS, 'train/loss_ce_0', 'train/loss_mask_0', 'train/loss_dice_0',
                'learning_rate', 'train/grad_norm') + (('steps_per_sec',) if step > 1 else ()):
      assert key in record and np.isfinite(record[key]), (key, record)
    terms = sum(v for k, v in record.items() if k.startswith('train/loss_'))
    assert record['train/loss'] == pytest.approx(terms, rel=1e-5)
  assert 'steps_per_sec' not in records[1]  # the first step's time is its compilation
  # Learning rate of step s is the schedule at s - 1 updates done (mmcv's runner.iter).
  assert records[1]['learning_rate'] == pytest.approx(1e-3 * 1e-6, rel=1e-4)
  assert records[3]['learning_rate'] == pytest.approx(1e-3 * (1 - 2 / 6), rel=1e-5)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [json.loads(line) for line in f if 'val/miou' in line]
  assert len(evals) == 1 and evals[0]['step'] == 6
  for key in ('val/miou', 'val/macc', 'val/aacc', 'val/iou/background', 'val/seconds'):
    assert key in evals[0], key
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == 6 and final['miou'] == pytest.approx(evals[0]['val/miou'])
  assert result['val/miou'] == pytest.approx(final['miou'])
  assert result['figure_file'] == os.path.join(workdir, 'predictions.png')
  assert os.path.getsize(os.path.join(workdir, 'predictions.png')) > 1000
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  assert tiny_runs.steps(workdir) == [3, 6]
  with open(os.path.join(workdir, 'parameters.txt')) as f:
    assert 'backbone/patch_embed/kernel' in f.read()


def test_rerunning_a_finished_run_says_it_is_done(reference, tmp_path, capfd):
  workdir, _ = reference
  before = os.path.getmtime(os.path.join(workdir, 'final_metrics.json'))
  result = _train(workdir, evals__val__every_steps=6, evals__figure__every_steps=-1)
  assert result['already_done'] and result['step'] == 6
  assert 'Already trained to step 6' in capfd.readouterr().out
  assert os.path.getmtime(os.path.join(workdir, 'final_metrics.json')) == before


def test_sigkill_after_checkpoint_resumes_exactly(reference, tmp_path):
  ref = tiny_runs.losses(reference[0])
  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, 'hang_after:3')
  try:
    tiny_runs.wait_for(lambda: 3 in tiny_runs.steps(workdir), proc, 300, 'the step-3 checkpoint')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert max(tiny_runs.losses(workdir)) == 3  # killed before step 4

  _train(workdir)  # resumes in-process
  resumed = tiny_runs.losses(workdir)
  for step in (4, 5, 6):
    for key in TERMS:
      assert resumed[step][key] == ref[step][key], (step, key)
  assert tiny_runs.steps(workdir) == [3, 6]


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_continues(reference, tmp_path):
  """Preempted at step 4; a resume that diverges at once stops without touching the
  checkpoints; a normal resume then continues exactly as the uninterrupted run."""
  ref = tiny_runs.losses(reference[0])
  workdir = str(tmp_path / 'preempted')
  code, out = _signal_at(workdir, 4, signal.SIGTERM)
  assert code == 0, out[-4000:]
  assert 'SIGTERM: saved step 4' in out and 'Traceback' not in out
  assert tiny_runs.steps(workdir) == [3, 4]

  # A NaN loss weight makes step 5 non-finite right after the resume.
  with pytest.raises(step_lib.NonFiniteLossError, match='Non-finite loss at step 5') as e:
    _train(workdir, loss__mask_weight=float('nan'), checkpoint_every_steps=1)
  assert 'loss_mask=nan' in str(e.value) and 'loss_ce=' in str(e.value)
  assert tiny_runs.steps(workdir) == [3, 4]

  _train(workdir)
  resumed = tiny_runs.losses(workdir)
  for step in (5, 6):
    assert resumed[step]['train/loss'] == ref[step]['train/loss'], step
  assert tiny_runs.steps(workdir) == [3, 4, 6]


def test_ctrl_c_saves_exits_130_and_the_rerun_continues_bit_identically(reference, tmp_path):
  ref = tiny_runs.losses(reference[0])
  workdir = str(tmp_path / 'interrupted')
  code, out = _signal_at(workdir, 2, signal.SIGINT)
  assert code == 130, out[-4000:]
  lines = [line for line in out.splitlines() if 'saved step' in line]
  assert len(lines) == 1 and 'SIGINT: saved step 2' in lines[0], out[-4000:]
  assert 'Traceback' not in out and 'KeyboardInterrupt' not in out
  assert tiny_runs.steps(workdir) == [2]
  _train(workdir)
  resumed = tiny_runs.losses(workdir)
  for step in range(3, 7):
    for key in TERMS:
      assert resumed[step][key] == ref[step][key], (step, key)


def test_thirty_step_run_prints_its_progress_in_few_lines(tmp_path):
  """The console at the default verbosity: progress, evaluation summaries, results."""
  result = subprocess.run(
      tiny_runs.main_cmd(str(tmp_path / 'quiet'), num_train_steps=30, log_every_steps=10,
                         checkpoint_every_steps=15, evals__val__every_steps=15,
                         evals__figure__every_steps=-1),
      cwd=ROOT, env=tiny_runs.env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = (result.stdout + result.stderr).splitlines()
  assert len(lines) <= 40, '\n'.join(lines)
  assert sum('ETA' in line and 'steps/s' in line for line in lines) == 3
  assert lines[-2].startswith('Validation: mIoU') and 'at step 30' in lines[-2]
  assert lines[-1].startswith('Predictions: ')


def test_eval_mode_on_workdir_and_exported_params(reference, tmp_path):
  workdir, _ = reference
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  overrides = dict(evals__val__every_steps=6, evals__figure__every_steps=-1,
                   evals__figure__num_images=2)
  predictions_before = os.path.getmtime(os.path.join(workdir, 'predictions.png'))

  config = tiny_runs.tiny_config(init_checkpoint=workdir, **overrides)
  out = eval_mode.evaluate_checkpoint(config, str(tmp_path / 'eval_workdir'), devices=ONE_DEVICE)
  assert out['step'] == 6 and out['val/miou'] == pytest.approx(final['miou'], abs=1e-9)

  # The same params as an exported directory.
  run = build.setup(config, ONE_DEVICE)
  params, _ = parameters.load_params(workdir, run.spec.abstract.params)
  exported = str(tmp_path / 'exported')
  parameters.export_params(exported, jax.device_get(params), config, {'source': 'test'})
  config = tiny_runs.tiny_config(init_checkpoint=exported, **overrides)
  out = eval_mode.evaluate_checkpoint(config, str(tmp_path / 'eval_exported'), devices=ONE_DEVICE)
  assert out['val/miou'] == pytest.approx(final['miou'], abs=1e-9)

  for name in ('eval_workdir', 'eval_exported'):
    with open(tmp_path / name / 'eval_metrics.json') as f:
      saved = json.load(f)
    assert saved['miou'] == pytest.approx(final['miou'], abs=1e-9)
    assert set(saved['per_class_iou']) == {'background', 'h-stripes circle', 'v-stripes square'}
    assert os.path.getsize(tmp_path / name / 'eval_predictions.png') > 1000
  with open(tmp_path / 'eval_workdir' / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [6]
  assert os.path.getmtime(os.path.join(workdir, 'predictions.png')) == predictions_before


# ---------------------------------------------------------------------------------------------
# Meshes: the same training on 1 device and on 8 (data, model and fsdp parallel).

_MESH_RUN = dict(num_train_steps=5, checkpoint_every_steps=3, **{
    # One block and one decoder stage: the same sharded ops at half the compile time (aux
    # outputs and two stages are covered by the single-device runs above).
    'model.depth': 1, 'model.out_indices': (0,), 'model.use_stages': 1,
    'model.decoder_layers': 1})
_MESHES = ('data:8', 'data:4,model:2', 'data:2,fsdp:4')


def _mesh_losses(workdir):
  return {s: r['train/loss'] for s, r in tiny_runs.losses(str(workdir)).items()}


@pytest.fixture(scope='session')  # session scope: see `reference` in conftest.py
def mesh_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp('meshes')
  _train(out / '1', **_MESH_RUN)
  runs = {'1': _mesh_losses(out / '1')}
  for mesh in _MESHES:
    workdir = out / mesh.replace(':', '').replace(',', '_')
    _train(workdir, devices=None, mesh=mesh, **_MESH_RUN)
    runs[mesh] = _mesh_losses(workdir)
  # The fsdp run's step-3 checkpoint, resumed on another mesh and on one device.
  for name, mesh, devices in (('restored_model', 'data:4,model:2', None),
                              ('restored_1', 'data:-1', ONE_DEVICE)):
    shutil.copytree(out / 'data2_fsdp4' / 'checkpoints' / '3',
                    out / name / 'checkpoints' / '3')
    _train(out / name, devices=devices, mesh=mesh, **_MESH_RUN)
    runs[name] = _mesh_losses(out / name)
  return runs


@pytest.mark.slow
def test_meshes_match_one_device_and_restore_onto_other_meshes(mesh_runs):
  ref = mesh_runs['1']
  assert sorted(ref) == [1, 2, 3, 4, 5]
  assert len(set(ref.values())) == 5  # the loss moves: the steps really train
  for name in _MESHES:
    assert sorted(mesh_runs[name]) == [1, 2, 3, 4, 5], name
    for step in ref:
      assert mesh_runs[name][step] == pytest.approx(ref[step], rel=1e-4), (name, step)
  # The fsdp run's step-3 checkpoint, restored on another mesh and on one device.
  for name in ('restored_model', 'restored_1'):
    got = mesh_runs[name]
    assert sorted(got) == [4, 5], name
    for step in got:
      assert got[step] == pytest.approx(ref[step], rel=1e-4), (name, step)


def _specs(tree):
  return {jax.tree_util.keystr(k): str(tuple(v.spec))
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_parameters_and_moments_are_sharded():
  specs = {}
  for mesh in ('data:4,model:2', 'data:2,fsdp:4'):
    run = build.setup(tiny_runs.tiny_config(mesh=mesh, **_MESH_RUN))
    layout = state_lib.update_shardings(run.spec.model_params, run.spec.abstract.params)
    specs[mesh] = (_specs(run.spec.model_params), _specs(run.spec.shardings.params),
                   _specs(run.spec.shardings.opt_state[1].mu),
                   _specs(jax.tree.map(lambda a: a.sharding, run.spec.abstract.params)),
                   _specs(layout))
  assert any("'model'" in s for s in specs['data:4,model:2'][0].values())
  assert any("'fsdp'" in s for s in specs['data:2,fsdp:4'][0].values())
  for model, stored, mu, abstract, layout in specs.values():
    # The state keeps parameters and Adam moments where the update runs, split over 'data' too;
    # the model reads the parameters gathered over it.
    assert abstract == stored == mu == layout
    assert any("'data'" in s for s in stored.values())
    assert not any("'data'" in s for s in model.values())


# ---------------------------------------------------------------------------------------------
# The step: gradient accumulation and bfloat16.


def _batch():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  labels = np.zeros((8, 32, 32), np.int32)
  labels[:, 8:20, 4:24] = 1
  labels[::2, 20:, 16:] = 2
  labels[1, :4] = 255
  return images, jnp.asarray(labels)


def _one_step(config, params=None, opt_state=None):
  run = build.setup(config, ONE_DEVICE)
  with jax.set_mesh(run.mesh):
    if params is None:
      state = state_lib.create_state(run.model, run.tx, config, run.spec)
    else:
      state = jax.device_put(state_lib.TrainState(np.int32(0), params, opt_state),
                             run.spec.shardings)
    start = jax.tree.map(np.asarray, (state.params, state.opt_state))
    step = step_lib.make_train_step(run.model, run.tx, run.schedule, config, run.mesh,
                                    run.spec)
    images, labels = _batch()
    new_state, metrics = step(state, {'image': images, 'label': labels})
  return run, start, jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.slow
def test_grad_accumulation_is_adamw_on_the_mean_gradient():
  config = tiny_runs.tiny_config(optim__grad_accum_steps=2, model__drop_path_rate=0.0,
                                 model__decoder_dropout=0.0)
  run, (params0, opt0), new_state, metrics = _one_step(config)
  images, labels = _batch()

  @jax.jit
  def loss_and_grad(params, x, y):
    def f(p):
      outputs = run.model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(0)})
      return losses.atm_loss(outputs, y, num_classes=3, **dict(config.loss))[0]
    return jax.value_and_grad(f)(params)

  (l1, g1), (l2, g2) = (loss_and_grad(params0, images[i::2], labels[i::2]) for i in (0, 1))
  grads = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want = jax.device_get(jax.jit(lambda g, o, p: optax.apply_updates(p, run.tx.update(g, o, p)[0]))(
      grads, opt0, params0))
  assert int(new_state.step) == 1
  assert metrics['loss'] == pytest.approx(float((l1 + l2) / 2), rel=1e-5)
  diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b - c)) + 1e-12))
             for a, b, c in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want),
                                jax.tree.leaves(params0)))
  assert diff < 1e-3

  # bfloat16 compute from the same start: float32 parameters, a loss close to float32's.
  config.model.dtype = 'bfloat16'
  _, _, bf16_state, bf16 = _one_step(config, params0, opt0)
  assert {str(x.dtype) for x in jax.tree.leaves(bf16_state.params)} == {'float32'}
  assert bf16['loss'] == pytest.approx(metrics['loss'], rel=0.05)
  assert bf16['loss'] != metrics['loss']  # it did compute in bfloat16


def test_itstime():
  due = [s for s in range(1, 11) if loop.itstime(s, 4, 10)]
  assert due == [4, 8, 10]
  assert [s for s in range(1, 11) if loop.itstime(s, -1, 10)] == [10]
  assert not any(loop.itstime(s, 0, 10) for s in range(1, 11))
