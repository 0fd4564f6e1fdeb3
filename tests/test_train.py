"""The trainer end to end at tiny sizes: meshes, resume after SIGKILL, SIGTERM, non-finite loss.

Every run is a subprocess: meshes need 8 simulated CPU devices set before JAX starts, and the
fault tests kill processes. The tiny config and the run helpers are in tests/tiny_runs.py.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

ROOT = tiny_runs.ROOT

_CACHE_DIR = []  # a JAX compilation cache shared by this module's runs (set by a fixture)


@pytest.fixture(scope='module', autouse=True)
def _compilation_cache(tmp_path_factory):
  _CACHE_DIR[:] = [str(tmp_path_factory.mktemp('jax_cache'))]
  yield
  _CACHE_DIR.clear()


def _env(num_devices=1):
  return tiny_runs.env(num_devices, _CACHE_DIR[0] if _CACHE_DIR else None)


_main_cmd = tiny_runs.main_cmd
_losses = tiny_runs.losses
_steps = tiny_runs.steps
_wait_for = tiny_runs.wait_for


def _run(workdir, timeout=240, **overrides):
  return subprocess.run(_main_cmd(workdir, **overrides), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 6-step run with an evaluation at the end and predictions drawn."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = _run(workdir, eval_every_steps=6, num_prediction_images=2)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, result


def test_reference_run_logs_and_evaluates(reference):
  workdir, result = reference
  records = _losses(workdir)
  assert sorted(records) == [1, 2, 3, 4, 5, 6]
  for record in records.values():
    for key in ('train/loss', 'train/loss_ce', 'train/loss_mask', 'train/loss_dice',
                'train/loss_ce_0', 'train/loss_mask_0', 'train/loss_dice_0', 'learning_rate',
                'steps_per_sec', 'train/grad_norm'):
      assert key in record and np.isfinite(record[key]), (key, record)
    terms = sum(v for k, v in record.items() if k.startswith('train/loss_'))
    assert record['train/loss'] == pytest.approx(terms, rel=1e-5)
  # Learning rate of step s is the schedule at s - 1 updates done (mmcv's runner.iter).
  assert records[1]['learning_rate'] == pytest.approx(1e-3 * 1e-6, rel=1e-4)
  assert records[3]['learning_rate'] == pytest.approx(1e-3 * (1 - 2 / 6), rel=1e-5)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [json.loads(l) for l in f if 'eval/miou' in l]
  assert len(evals) == 1 and evals[0]['step'] == 6
  for key in ('eval/miou', 'eval/macc', 'eval/aacc', 'eval/iou/background'):
    assert key in evals[0], key
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['miou'] == pytest.approx(evals[0]['eval/miou'])
  assert os.path.getsize(os.path.join(workdir, 'predictions.png')) > 1000
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  assert _steps(workdir) == [3, 6]
  assert 'ETA' in result.stderr and 'steps/s' in result.stderr


def test_sigkill_after_checkpoint_resumes_exactly(reference, tmp_path):
  ref = _losses(reference[0])
  workdir = str(tmp_path / 'killed')
  proc = subprocess.Popen(_main_cmd(workdir, fault_hang_after_step=3), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(lambda: 3 in _steps(workdir), proc, 240, 'the step-3 checkpoint')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert max(_losses(workdir)) == 3  # killed before step 4

  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Resuming from' in result.stderr
  resumed = _losses(workdir)
  for step in (4, 5, 6):
    for key in ('train/loss', 'train/loss_ce', 'train/loss_mask', 'train/loss_dice'):
      assert resumed[step][key] == ref[step][key], (step, key)
  assert _steps(workdir) == [3, 6]


def test_sigterm_saves_and_exits_zero_then_continues(reference, tmp_path):
  """Preempted at step 4; a resume that diverges at once stops without touching the
  checkpoints; a normal resume then continues exactly as the uninterrupted run."""
  ref = _losses(reference[0])
  workdir = str(tmp_path / 'preempted')
  proc = subprocess.Popen(_main_cmd(workdir, fault_hang_after_step=4), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(lambda: 4 in _losses(workdir) if os.path.exists(
        os.path.join(workdir, 'metrics.jsonl')) else False, proc, 240, 'step 4')
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-4000:]
  assert 'Preempted: saved step 4' in out
  assert _steps(workdir) == [3, 4]

  # A NaN loss weight makes step 5 non-finite right after the resume.
  result = _run(workdir, loss__mask_weight='nan', checkpoint_every_steps=1)
  assert result.returncode == 1, result.stderr[-4000:]
  assert 'Non-finite loss at step 5' in result.stderr
  assert 'loss_mask=nan' in result.stderr and 'loss_ce=' in result.stderr
  assert _steps(workdir) == [3, 4]

  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  resumed = _losses(workdir)
  for step in (5, 6):
    assert resumed[step]['train/loss'] == ref[step]['train/loss'], step
  assert _steps(workdir) == [3, 4, 6]


_EVAL_SCRIPT = r"""
import json, os, sys
import jax
from segvit_jax import checkpoint, sharding, train
sys.path.insert(0, os.path.join(sys.argv[1], 'configs'))
import synthetic

reference, out_dir = sys.argv[3], sys.argv[4]
config = synthetic.get_config()
for key, value in json.loads(sys.argv[2]).items():
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = tuple(value) if isinstance(value, list) else value
out = {}
# A training workdir as init_checkpoint.
config.init_checkpoint = reference
out['workdir'] = train.evaluate_checkpoint(config, os.path.join(out_dir, 'eval_workdir'))
# The same params written as a converted checkpoint (`segvit_jax.convert`'s layout).
_, _, _, _, spec = train._setup(config, None)
params, _ = checkpoint.load_params(reference, spec.abstract.params)
converted = os.path.join(out_dir, 'converted')
checkpoint.export_params(converted, jax.device_get(params), config, {'source': 'test'})
config.init_checkpoint = converted
out['converted'] = train.evaluate_checkpoint(config, os.path.join(out_dir, 'eval_converted'))
print('RESULT ' + json.dumps(out))
"""


def test_eval_mode_on_workdir_and_converted_checkpoint(reference, tmp_path):
  workdir, _ = reference
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_runs.TINY.items()}
  overrides['num_prediction_images'] = 2
  result = subprocess.run(
      [sys.executable, '-c', _EVAL_SCRIPT, ROOT, json.dumps(overrides), workdir, str(tmp_path)],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  out = json.loads([l for l in result.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
  for name in ('workdir', 'converted'):
    assert out[name]['eval/miou'] == pytest.approx(final['miou'], abs=1e-9), name
    with open(tmp_path / f'eval_{name}' / 'eval_metrics.json') as f:
      saved = json.load(f)
    assert saved['miou'] == pytest.approx(final['miou'], abs=1e-9)
    assert set(saved['per_class_iou']) == {'background', 'h-stripes circle', 'v-stripes square'}
    assert os.path.getsize(tmp_path / f'eval_{name}' / 'predictions.png') > 1000


_MESH_SCRIPT = r'''
import json, os, shutil, sys
import jax
import ml_collections
from segvit_jax import sharding, train
sys.path.insert(0, os.path.join(sys.argv[1], 'configs'))
import synthetic

overrides, out_dir = json.loads(sys.argv[2]), sys.argv[3]

def make_config(mesh):
  config = synthetic.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  config.mesh = mesh
  return config

def losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    if 'train/loss' in r:
      out[r['step']] = r['train/loss']
  return out

result = {'devices': jax.device_count(), 'losses': {}, 'specs': {}}
runs = [('1', 'data:1', jax.devices()[:1]), ('data:8', 'data:8', None),
        ('data:4,model:2', 'data:4,model:2', None), ('data:2,fsdp:4', 'data:2,fsdp:4', None)]
for name, mesh, devices in runs:
  workdir = os.path.join(out_dir, name.replace(':', '').replace(',', '_'))
  train.train_and_evaluate(make_config(mesh), workdir, devices=devices)
  result['losses'][name] = losses(workdir)

# Where parameters and Adam moments live: the shardings the state is created with (jit
# out_shardings) and restored onto.
for mesh_name in ('data:4,model:2', 'data:2,fsdp:4'):
  config = make_config(mesh_name)
  mesh, model, tx, _, spec = train._setup(config, None)
  flat = lambda tree: {jax.tree_util.keystr(k): str(tuple(v.spec))
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  result['specs'][mesh_name] = {'params': flat(spec.shardings.params),
                                'mu': flat(spec.shardings.opt_state[1].mu),
                                'abstract': flat(jax.tree.map(lambda a: a.sharding,
                                                              spec.abstract.params))}

# Restore the 8-device data:2,fsdp:4 run's step-3 checkpoint onto another mesh and onto 1 device.
source = os.path.join(out_dir, 'data2_fsdp4')
for name, mesh, devices in [('restored_model', 'data:4,model:2', None),
                            ('restored_1', 'data:1', jax.devices()[:1])]:
  workdir = os.path.join(out_dir, name)
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  shutil.copytree(os.path.join(source, 'checkpoints', '3'),
                  os.path.join(workdir, 'checkpoints', '3'))
  train.train_and_evaluate(make_config(mesh), workdir, devices=devices)
  result['losses'][name] = losses(workdir)
print('RESULT ' + json.dumps(result))
'''


@pytest.fixture(scope='module')
def mesh_runs(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp('meshes'))
  overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_runs.TINY.items()}
  overrides['num_train_steps'] = 5
  overrides['checkpoint_every_steps'] = 3
  # One block and one decoder stage: the same sharded ops at half the compile time (aux
  # outputs and two stages are covered by the single-device runs above).
  overrides.update({'model.depth': 1, 'model.out_indices': [0], 'model.use_stages': 1,
                    'model.decoder_layers': 1})
  result = subprocess.run(
      [sys.executable, '-c', _MESH_SCRIPT, ROOT, json.dumps(overrides), out_dir], cwd=ROOT,
      env=_env(8), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def test_meshes_match_one_device(mesh_runs):
  assert mesh_runs['devices'] == 8
  ref = {int(k): v for k, v in mesh_runs['losses']['1'].items()}
  assert sorted(ref) == [1, 2, 3, 4, 5]
  assert len(set(ref.values())) == 5  # the loss moves: the steps really train
  for name in ('data:8', 'data:4,model:2', 'data:2,fsdp:4'):
    got = {int(k): v for k, v in mesh_runs['losses'][name].items()}
    assert sorted(got) == [1, 2, 3, 4, 5], name
    for step in ref:
      assert got[step] == pytest.approx(ref[step], rel=1e-4), (name, step)


def test_restore_onto_other_mesh_and_device_count(mesh_runs):
  ref = {int(k): v for k, v in mesh_runs['losses']['1'].items()}
  for name in ('restored_model', 'restored_1'):
    got = {int(k): v for k, v in mesh_runs['losses'][name].items()}
    assert sorted(got) == [4, 5], name
    for step in got:
      assert got[step] == pytest.approx(ref[step], rel=1e-4), (name, step)


def test_parameters_and_moments_are_sharded(mesh_runs):
  model_specs = mesh_runs['specs']['data:4,model:2']
  fsdp_specs = mesh_runs['specs']['data:2,fsdp:4']
  assert any("'model'" in s for s in model_specs['params'].values())
  assert any("'fsdp'" in s for s in fsdp_specs['params'].values())
  # Adam moments are laid out exactly as their parameters.
  for specs in (model_specs, fsdp_specs):
    assert specs['mu'] == specs['params']
    assert specs['abstract'] == specs['params']
  # No parameter is split over the batch axis 'data'.
  assert not any("'data'" in s for s in fsdp_specs['params'].values())


_STEP_SCRIPT = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np, optax
from segvit_jax import losses, sharding, train
sys.path.insert(0, os.path.join(sys.argv[1], 'configs'))
import synthetic

def make_config(**extra):
  config = synthetic.get_config()
  for key, value in {**json.loads(sys.argv[2]), **extra}.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config

rng = np.random.default_rng(0)
images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
labels = np.zeros((8, 32, 32), np.int32)
labels[:, 8:20, 4:24] = 1
labels[::2, 20:, 16:] = 2
labels[1, :4] = 255
labels = jnp.asarray(labels)
out = {}

# Gradient accumulation (2 strided micro-batches), dropout off.
config = make_config(**{'optim.grad_accum_steps': 2,
                        'model.drop_path_rate': 0.0, 'model.decoder_dropout': 0.0})
mesh, model, tx, schedule, spec = train._setup(config, jax.devices()[:1])
with jax.set_mesh(mesh), sharding.axis_rules():
  state = train.create_state(model, tx, config, spec)
  params0 = jax.tree.map(np.asarray, state.params)
  opt0 = jax.tree.map(np.asarray, state.opt_state)
  step = train.make_train_step(model, tx, schedule, config, mesh, spec.shardings)
  new_state, metrics = step(state, {'image': images, 'label': labels})

  @jax.jit
  def loss_and_grad(params, x, y):
    def f(p):
      outputs = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(0)})
      return losses.atm_loss(outputs, y, num_classes=3, **dict(config.loss))[0]
    return jax.value_and_grad(f)(params)

  l1, g1 = loss_and_grad(params0, images[0::2], labels[0::2])
  l2, g2 = loss_and_grad(params0, images[1::2], labels[1::2])
  grads = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))(
      grads, opt0, params0)
  got, want = jax.device_get((new_state.params, want))
  diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b - c)) + 1e-12))
             for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                                jax.tree.leaves(params0)))
  out['accum'] = {'loss': float(metrics['loss']), 'want_loss': float((l1 + l2) / 2),
                  'max_update_rel_diff': diff, 'step': int(new_state.step)}

# bfloat16 compute, same start and micro-batches: float32 parameters, a loss close to float32's.
config = make_config(**{'optim.grad_accum_steps': 2, 'model.dtype': 'bfloat16',
                        'model.drop_path_rate': 0.0, 'model.decoder_dropout': 0.0})
mesh, model, tx, schedule, spec = train._setup(config, jax.devices()[:1])
with jax.set_mesh(mesh), sharding.axis_rules():
  state = jax.device_put(train.TrainState(step=np.int32(0), params=params0, opt_state=opt0),
                         spec.shardings)
  step = train.make_train_step(model, tx, schedule, config, mesh, spec.shardings)
  new_state, metrics = step(state, {'image': images, 'label': labels})
  out['bf16'] = {'loss': float(metrics['loss']), 'f32_loss': float((l1 + l2) / 2),
                 'param_dtypes': sorted({str(x.dtype) for x in jax.tree.leaves(new_state.params)})}
print('RESULT ' + json.dumps(out))
'''


def test_grad_accumulation_and_bf16(tmp_path):
  overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_runs.TINY.items()}
  result = subprocess.run([sys.executable, '-c', _STEP_SCRIPT, ROOT, json.dumps(overrides)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  out = json.loads([l for l in result.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
  accum = out['accum']
  assert accum['step'] == 1
  assert accum['loss'] == pytest.approx(accum['want_loss'], rel=1e-5)
  # The update equals AdamW on the mean of the two micro-batch gradients.
  assert accum['max_update_rel_diff'] < 1e-3
  bf16 = out['bf16']
  assert bf16['param_dtypes'] == ['float32']
  assert bf16['loss'] == pytest.approx(bf16['f32_loss'], rel=0.05)
  assert bf16['loss'] != bf16['f32_loss']  # it did compute in bfloat16


def test_checkpointer_keeps_last_n_and_best(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from segvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep=2)
  mious = {1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: None, 6: 0.4}
  for step, miou in mious.items():
    metrics = None if miou is None else {'eval/miou': miou}
    ckpt.save(step, {'w': jnp.full((3,), step, jnp.float32)}, metrics=metrics)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 5, 6]  # the last two, plus the best mIoU (step 2)
  restored = ckpt.restore(2, {'w': jax_struct((3,))})
  assert restored['w'].tolist() == [2.0, 2.0, 2.0]
  ckpt.close()
  reader = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), read_only=True)
  assert reader.latest_step() == 6
  with pytest.raises(ValueError, match='read-only'):
    reader.save(7, {'w': jnp.zeros((3,))})
  reader.close()
  assert checkpoint.training_checkpoint_root(str(tmp_path)) is None
  assert checkpoint.training_checkpoint_root(str(tmp_path / 'ckpt')) == str(tmp_path / 'ckpt')


def jax_struct(shape):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.ShapeDtypeStruct(shape, np.float32)
