"""bench/gpu_check.py's dry run end to end on CPU: every section runs with tiny models and reports
real numbers; with PyTorch hidden, the PyTorch parts are left out with one line and the rest runs.

The dry runs get a generous total budget (--budget_s): the sections' time limits scale with it,
so that a busy test machine slows the check down rather than cutting sections short.
"""

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check
from bench import throughput

BUDGET_S = 400


def _dry_run(out, env, *args):
  """(completed process, the JSON report) of `python -m bench.gpu_check --dry_run`."""
  proc = subprocess.run(
      [sys.executable, '-m', 'bench.gpu_check', '--dry_run', f'--out={out}',
       f'--budget_s={BUDGET_S}', *args],
      cwd=gpu_check.ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert os.path.exists(out / 'gpu_check.json'), proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc, json.loads((out / 'gpu_check.json').read_text())


def _assert_parity(parity):
  assert parity['cases'], parity
  for key, case in parity['cases'].items():
    assert case['status'] == 'ok' and case['pass'], (key, case)
    assert case['gradients_judged'] > 10, key
    # The key biases' gradients vanish in exact arithmetic: left out of the judged ones.
    assert any(path.endswith('key/bias') for path in case['gradients_below_floor']), key
    forward, gradient = case['forward_worst'][1], case['gradient_worst'][1]
    if key.endswith('float32'):
      assert 0 < forward <= gpu_check.F32_TOLERANCE and 0 < gradient <= gpu_check.F32_TOLERANCE
    else:
      for part in ('forward', 'gradient'):
        check = case['vs_float32'][part]
        assert 0 < check['jax_vs_float32'][1] <= check['bar'], (key, part, check)
        assert check['bar'] >= gpu_check.BF16_TOLERANCE


def _assert_train_step(section):
  pairs = section['pairs']
  assert len(pairs) == len(gpu_check.DRY_RUN.train_pairs)
  for key, pair in pairs.items():
    assert pair['status'] == 'ok', (key, pair)
    assert pair['batch'] in gpu_check.DRY_RUN.batches
    assert pair['step_s'] > 0 and pair['compile_s'] > 0 and pair['images_per_s'] > 0, key
    assert pair['mfu_vs_matmul'] > 0, key
    eager = pair['torch_eager']
    assert eager['batch'] == pair['batch'] and eager['median_s'] > 0, (key, eager)
    assert eager['jax_over_torch'] > 0, key
    assert pair['torch_compile']['status'] in ('ok', 'skipped'), key
  official = section['official_batch_2_float32']
  assert official and all(v['fits'] for v in official.values()), official


def _assert_train_run(run, out):
  assert run['pass'], run['checks']
  assert all(run['checks'].values()), run['checks']
  assert 0 < run['saved_at_sigterm'] < run['steps'] == run['final_step']
  assert run['resumed_from'] == run['saved_at_sigterm']
  assert 0 <= run['miou'] <= 1 and run['final_loss'] > 0
  workdir = out / 'train_run' / 'workdir'
  for name in ('final_metrics.json', 'metrics.jsonl', 'predictions.png'):
    assert (workdir / name).exists(), name
  assert (out / 'train_run' / 'predict' / 'labels' / 'input.png').exists()


@pytest.mark.slow
def test_dry_run_measures_every_section(tmp_path, subprocess_env):
  out = tmp_path / 'check'
  proc, report = _dry_run(out, subprocess_env(1))
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  for name in gpu_check.SECTIONS:
    assert report[name]['status'] == 'ok', (name, report[name])
  assert report['environment']['jax']['platform'] == 'cpu'
  for framework in ('jax', 'torch'):
    matmul = report['matmul_ceiling'][framework]
    assert matmul['tflops'] > 0 and matmul['finite_nonzero'], matmul
  _assert_parity(report['parity'])
  attention = report['attention']
  assert attention['candidate'] == 'per_head' and 'cuDNN' in attention['note']
  assert len(attention['cases']) == len(gpu_check.DRY_RUN.attention_shapes)
  for case in attention['cases'].values():
    assert 0 < case['worst'] <= gpu_check.BF16_TOLERANCE and case['pass'], case
  _assert_train_step(report['train_step'])
  _assert_train_run(report['train_run'], out)
  slide = report['slide_eval']
  assert slide['jax']['images_per_s'] > 0 and slide['torch']['images_per_s'] > 0
  assert slide['image_hw'] == [64, 96]  # 48x72 test-resized by (128, 64)
  # Nothing imported TensorFlow: not the workers, not the command-line runs.
  seen = [*report['environment']['tensorflow_imported'].values(),
          *report['parity']['tensorflow_imported'].values(),
          report['attention']['tensorflow_imported']]
  seen += [p['tensorflow_imported'] for p in report['train_step']['pairs'].values()]
  seen += [r['tensorflow_imported'] for r in report['train_run']['runs'].values()]
  assert seen and not any(seen), seen
  table = (out / 'gpu_check.md').read_text()
  assert table.splitlines()[2].startswith('| section | measurement |')
  for name in gpu_check.SECTIONS:
    assert f'| {name} |' in table, name
  assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])
  assert report['check']['exit_status'] == 0
  assert not (out / '.workers').exists()  # the scratch folder is gone


def test_without_torch_the_pytorch_parts_are_left_out(tmp_path, subprocess_env):
  hidden = tmp_path / 'no_torch' / 'torch'
  hidden.mkdir(parents=True)
  (hidden / '__init__.py').write_text(
      'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
  env = subprocess_env(1, pythonpath=[str(tmp_path / 'no_torch'), gpu_check.ROOT])
  out = tmp_path / 'check'
  proc, report = _dry_run(out, env, '--sections=matmul_ceiling,parity,slide_eval')
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  left_out = [line for line in proc.stdout.splitlines()
              if line.startswith(gpu_check.TORCH_ABSENT)]
  assert left_out == [f'{gpu_check.TORCH_ABSENT}: torch is not installed '
                      "(ModuleNotFoundError: No module named 'torch')"], left_out
  assert report['environment']['status'] == 'ok'
  assert report['environment']['torch']['status'] == 'skipped'
  assert report['matmul_ceiling']['torch']['status'] == 'skipped'
  assert report['parity']['status'] == 'skipped'
  slide = report['slide_eval']
  assert slide['status'] == 'ok' and slide['jax']['images_per_s'] > 0
  assert slide['torch']['status'] == 'skipped'
  assert 'train_step' not in report and 'train_run' not in report


def test_regional_compile_marks_every_block_and_decoder_layer():
  import segvit_reference as ref  # pylint: disable=g-import-not-at-top
  model = ref.build('shrunk', num_layers=4, decoder_layers=2, out_indices=(1, 3), shrink_idx=2)
  head = model.decode_head
  # 4 ViT blocks; the 2 QU decoders and the ATM decoder, 2 layers each (not the FFNs' Sequential).
  layers = [*model.backbone.layers, *head.decoder_1.layers, *head.decoder_2.layers,
            *head.atm.decoder_1.layers]
  assert len(layers) == 4 + 3 * 2
  assert throughput._compile_layers(model) == len(layers)  # pylint: disable=protected-access
  assert all(layer._compiled_call_impl is not None for layer in layers)  # pylint: disable=protected-access


def test_bfloat16_verdict_is_relative_to_the_references_own_rounding():
  def errors(forward, gradient):
    return {'scores': forward}, {'w': gradient, 'image gradient': gradient / 2}

  direct = errors(0.03, 0.3)
  # JAX's bf16 error against float32 within 3x PyTorch bf16's own: passes, though the direct
  # bf16-to-bf16 error is above 2e-2.
  ok = gpu_check._verdict(direct, errors(0.015, 0.25), errors(0.01, 0.1))  # pylint: disable=protected-access
  assert ok['pass'] and not ok['direct_within_bar']
  assert ok['vs_float32']['gradient']['bar'] == 3 * 0.1
  # An error of order 1 where the reference rounds to 10%: fails.
  bad = gpu_check._verdict(direct, errors(0.015, 0.9), errors(0.01, 0.1))  # pylint: disable=protected-access
  assert not bad['pass'] and not bad['vs_float32']['gradient']['pass']
  # float32: the worst of both against 1e-4.
  assert gpu_check._verdict(errors(2e-6, 5e-5))['pass']  # pylint: disable=protected-access
  assert not gpu_check._verdict(errors(2e-6, 2e-4))['pass']  # pylint: disable=protected-access
