"""bench/throughput.py end to end on the tiny synthetic model: both frameworks measured, the
side-by-side table printed, and the two worker processes never running a timed call at once."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_throughput_runs_jax_and_torch_in_alternation(tmp_path, repo_root):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'bench.throughput',
       '--config=' + os.path.join(repo_root, 'configs', 'synthetic.py'),
       '--config.model.patch_size=16',  # the PyTorch reference's patch size
       '--batch_size=2', '--steps=2', '--rounds=2', '--slide_size=64,96', '--torch',
       f'--json={out}'],
      capture_output=True, text=True, timeout=600, cwd=repo_root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'PyTorch/JAX' in proc.stdout
  run = json.loads(out.read_text())['runs'][0]
  assert run['dtype'] == 'float32'
  for framework in ('jax', 'torch'):
    result = run[framework]
    for key in ('train', 'infer', 'slide'):  # 2 rounds x 2 timed calls
      assert len(result[key]['times_s']) == 4 and result[key]['median_s'] > 0, (framework, key)
    # 3 measurements x 2 rounds.
    assert len(result['turn_spans']) == 6, framework
  assert run['jax']['compile_train_s'] > 0
  # Strict turns: no JAX turn overlaps a PyTorch turn.
  spans = sorted([(s, e, 'jax') for s, e in run['jax']['turn_spans']]
                 + [(s, e, 'torch') for s, e in run['torch']['turn_spans']])
  for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
    assert start >= end
  # ... and they alternate.
  assert [who for _, _, who in spans] == ['jax', 'torch'] * 6
