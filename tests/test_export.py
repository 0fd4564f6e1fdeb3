"""segvit-export: every format, reloaded in a fresh process, gives model.apply's scores and labels
(tiny ATM in model mode, tiny Shrunk end to end; batches 1 and 3 at a non-square size); bad
requests; segvit-predict --exported."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import run_cli
from conftest import subprocess_env
from segvit_jax.checkpoint import parameters
from segvit_jax.export import artifacts as export
from segvit_jax.data import mmseg_rules
from segvit_jax.models import resize
from segvit_jax.errors import UserError
from segvit_jax.models import segvit
import test_predict

SIZE = (32, 48)  # (H, W): non-square, a multiple of the patch size 16
BATCHES = (1, 3)
# Max abs difference of the scores from model.apply in float32 (the bars).
TOLERANCE = {'stablehlo': 1e-5, 'savedmodel': 1e-5, 'onnx': 1e-4}
EXPORT = 'segvit_jax.export'
# test_predict's random weights, matrices at half their gain. At full gain the tiny ATM's features
# reach ~100 and its scores move by 1.5e-5 when every weight moves by one ulp: two compilers
# (jax's XLA, TensorFlow's) then differ by that much whatever the export does. At half gain a
# one-ulp change moves them by 7e-7, so the 1e-5 bar measures the export.
GAIN = 0.5
_image = test_predict._image  # pylint: disable=protected-access


def _config(name):
  config = test_predict.tiny_config()
  if name == 'shrunk':
    config.model.update(dict(name='segvit_shrunk', depth=3, shrink_index=1, out_indices=(0, 2)))
  return config


@pytest.fixture(name='models', scope='module')
def models_fixture(tmp_path_factory):
  """Per model: checkpoint dir, mode, inputs (batch 3) and model.apply's float32 scores."""
  base = tmp_path_factory.mktemp('export')
  rng = np.random.default_rng(0)
  out = {}
  for name, end_to_end in (('atm', False), ('shrunk', True)):
    config = _config(name)
    model = segvit.build_model(config.model)
    params = test_predict.random_params(nn.unbox(segvit.abstract_params(model)), seed=len(out))
    params = jax.tree.map(lambda a: a * np.float32(GAIN) if a.ndim > 1 else a, params)
    ckpt = str(base / name)
    parameters.export_params(ckpt, params, config, {'source': 'test'})
    rgb = np.stack([_image(rng, *SIZE) for _ in range(max(BATCHES))])
    d = config.dataset
    normalised = (rgb.astype(np.float32) - np.asarray(d.mean, np.float32)) / np.asarray(
        d.std, np.float32)
    apply = jax.jit(lambda x: model.apply({'params': params}, x, train=False))
    out[name] = {'ckpt': ckpt, 'end_to_end': end_to_end, 'config': config, 'params': params,
                 'input': rgb if end_to_end else normalised,
                 'reference': np.asarray(apply(normalised))}  # image by image: any batch
  return out


def _export(models, fmt, directory):
  """Both models to `fmt`: ATM by segvit-export (a process), Shrunk by `export.export` (this
  process: the command line's code without a second start-up). Returns {name: artifact path}."""
  paths = {name: str(directory / f'{name}.{fmt}') for name in models}
  m = models['atm']
  proc = run_cli(EXPORT, f'--checkpoint={m["ckpt"]}', f'--format={fmt}',
                 f'--size={SIZE[0]}x{SIZE[1]}', f'--output={paths["atm"]}', check=True)
  assert proc.stdout.startswith(f'Exported {m["ckpt"]} -> {paths["atm"]} ({fmt}'), proc.stdout
  m = models['shrunk']
  export.export(m['ckpt'], fmt, SIZE, paths['shrunk'], end_to_end=True)
  return paths


# The fresh processes: each loads both artifacts of its format and runs batches 1 and 3, writing
# the outputs and its load / run seconds. StableHLO's runs where segvit_jax and flax cannot be
# imported (a None entry in sys.modules makes `import` raise ImportError).
_CHILD_HEAD = '''
import json, sys, time
import numpy as np
jobs = json.loads(sys.argv[1])
results, seconds = {}, {}
'''
_CHILDREN = {
    'stablehlo': '''
sys.modules['segvit_jax'] = None
sys.modules['flax'] = None
import jax
for key, job in jobs.items():
  t = time.perf_counter()
  with open(job['path'], 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  seconds[key + '/load'] = time.perf_counter() - t
  run = lambda x: exported.call(x)
''',
    'savedmodel': '''
import tensorflow as tf
for key, job in jobs.items():
  t = time.perf_counter()
  serve = tf.saved_model.load(job['path']).signatures['serving_default']
  seconds[key + '/load'] = time.perf_counter() - t
  run = lambda x: [v.numpy() for _, v in sorted(serve(images=tf.constant(x)).items())]
''',
    'onnx': '''
import onnxruntime as ort
for key, job in jobs.items():
  t = time.perf_counter()
  options = ort.SessionOptions()
  options.log_severity_level = 3
  session = ort.InferenceSession(job['path'], options, providers=['CPUExecutionProvider'])
  seconds[key + '/load'] = time.perf_counter() - t
  run = lambda x: session.run(None, {'images': x})
''',
}
_CHILD_TAIL = '''
  x = np.load(job['input'])
  for b in job['batches']:
    t = time.perf_counter()
    out = run(x[:b])
    out = [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    seconds[f'{key}/run{b}'] = time.perf_counter() - t
    # End to end: (labels, scores); sorted signature keys give the same order.
    results[f'{key}/{b}/scores'] = out[-1]
    if len(out) == 2:
      results[f'{key}/{b}/labels'] = out[0]
np.savez(job['output'], **results)
print(json.dumps(seconds))
'''


def _run_fresh(fmt, paths, models, directory):
  jobs = {}
  output = str(directory / f'{fmt}_outputs.npz')
  for name, path in paths.items():
    np.save(directory / f'{name}_input.npy', models[name]['input'])
    jobs[name] = {'path': path, 'input': str(directory / f'{name}_input.npy'),
                  'batches': list(BATCHES), 'output': output}
  script = directory / f'run_{fmt}.py'
  script.write_text(_CHILD_HEAD + _CHILDREN[fmt] + _CHILD_TAIL)
  # No repository on the path: cwd is the temporary folder, PYTHONPATH empty.
  proc = subprocess.run([sys.executable, str(script), json.dumps(jobs)], cwd=directory,
                        env=subprocess_env(pythonpath=[]), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  seconds = json.loads(proc.stdout.strip().splitlines()[-1])
  return np.load(output), seconds


def _check_parity(fmt, models, outputs, seconds):
  figures = {}
  for name, m in models.items():
    for b in BATCHES:
      ref = m['reference'][:b]
      scores = outputs[f'{name}/{b}/scores']
      assert scores.shape == ref.shape and scores.dtype == np.float32, (scores.shape, ref.shape)
      diff = float(np.abs(scores - ref).max())
      figures[f'{name}/{b}'] = diff
      assert diff <= TOLERANCE[fmt], (fmt, name, b, diff)
      labels = outputs[f'{name}/{b}/labels'] if m['end_to_end'] else scores.argmax(-1)
      assert labels.shape == ref.shape[:3]
      test_predict.assert_same_argmax(labels, ref)
  print(f'{fmt}: max abs diff {figures}; seconds {seconds}')


@pytest.mark.parametrize('fmt', export.FORMATS)
def test_artifact_in_a_fresh_process_matches_model_apply(models, tmp_path, fmt):
  paths = _export(models, fmt, tmp_path)
  for name, path in paths.items():
    with open(export.sidecar_path(fmt, path), encoding='utf-8') as f:
      info = json.load(f)
    h, w = SIZE
    assert info['size'] == [h, w] and info['num_classes'] == test_predict.K
    assert info['input']['layout'] == 'NHWC' and info['input']['shape'] == [None, h, w, 3]
    assert info['mode'] == ('end_to_end' if models[name]['end_to_end'] else 'model')
    assert info['normalization']['mean'] == [127.5] * 3
    assert len(info['palette']) == len(info['class_names']) == test_predict.K
  outputs, seconds = _run_fresh(fmt, paths, models, tmp_path)
  _check_parity(fmt, models, outputs, seconds)


def _error_line(proc) -> str:
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def test_bad_requests_are_one_error_line_and_write_nothing(models, tmp_path, monkeypatch):
  ckpt = models['atm']['ckpt']
  out = tmp_path / 'out'
  out.mkdir()
  line = _error_line(run_cli(EXPORT, f'--checkpoint={ckpt}', '--format=tflite', '--size=32x48',
                             f'--output={out / "m.tflite"}'))
  assert line == 'error: --format=tflite is not one of stablehlo, savedmodel, onnx.'
  # The rest in this process: the command line prints these UserErrors as the line above.
  with pytest.raises(UserError, match=re.escape(
      '--size=40x48 is not a multiple of the patch size 16 on each side; e.g. --size=48x48.')):
    export.export(ckpt, 'stablehlo', (40, 48), str(out / 'm.shlo'))
  not_a_checkpoint = tmp_path / 'photos'
  not_a_checkpoint.mkdir()
  with pytest.raises(UserError, match=re.escape(f'--checkpoint={not_a_checkpoint} is neither a '
                                                'directory written by segvit_jax.convert')):
    export.export(str(not_a_checkpoint), 'onnx', SIZE, str(out / 'm.onnx'))
  with pytest.raises(UserError, match='--dtype=bfloat16 is not available for --format=onnx'):
    export.export(ckpt, 'onnx', SIZE, str(out / 'm.onnx'), dtype='bfloat16')
  with pytest.raises(UserError, match='--platforms=cpu,gpu: each must be one of'):
    export.export(ckpt, 'stablehlo', SIZE, str(out / 'm.shlo'), platforms=('cpu', 'gpu'))

  # A failure while writing: the temporary folder goes, nothing is left under its name.
  def broken(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(export, 'stablehlo_bytes', broken)
  with pytest.raises(RuntimeError, match='disk full'):
    export.export(ckpt, 'stablehlo', SIZE, str(out / 'm.shlo'))
  assert not os.listdir(out)


def test_bfloat16_stablehlo_stays_close_to_float32(models, tmp_path):
  m = models['atm']
  path = str(tmp_path / 'bf16.shlo')
  info = export.export(m['ckpt'], 'stablehlo', SIZE, path, dtype='bfloat16')
  assert info['model']['dtype'] == 'bfloat16'
  with open(path, 'rb') as f:
    scores = np.asarray(jax.export.deserialize(bytearray(f.read())).call(m['input']))
  ref = m['reference']
  assert scores.dtype == np.float32
  assert 0 < np.abs(scores - ref).max() < 0.05  # bfloat16's rounding, not float32's
  assert (scores.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_predict_runs_an_exported_artifact(models, tmp_path):
  m = models['atm']
  path = str(tmp_path / 'atm.shlo')
  export.export(m['ckpt'], 'stablehlo', SIZE, path)
  rng = np.random.default_rng(1)
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  images = {'wide': _image(rng, 30, 70), 'tall': _image(rng, 50, 20)}
  for name, img in images.items():
    Image.fromarray(img).save(inputs / f'{name}.png')
  proc = run_cli('segvit_jax.predict', f'--exported={path}', str(inputs),
                 f'--output={tmp_path / "out"}', '--batch_size=2', '--scores',
                 '--scores_dtype=float32', check=True)
  assert proc.stdout.startswith('Segmented 2 images'), proc.stdout
  config = m['config']
  d = config.dataset
  model = segvit.build_model(config.model)
  for name, img in images.items():
    x = mmseg_rules.resize_linear(img, SIZE).astype(np.float32)
    x = (x - np.asarray(d.mean, np.float32)) / np.asarray(d.std, np.float32)
    s = model.apply({'params': m['params']}, jnp.asarray(x[None]), train=False)
    expected = np.asarray(resize.resize_bilinear(s, img.shape[:2]))[0]
    scores = np.load(tmp_path / 'out' / 'scores' / f'{name}.npy')
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    labels = np.asarray(Image.open(tmp_path / 'out' / 'labels' / f'{name}.png'))
    assert labels.shape == img.shape[:2]
    test_predict.assert_same_argmax(labels, expected)
