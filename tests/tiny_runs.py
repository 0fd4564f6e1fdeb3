"""Tiny end-to-end runs of the trainer, in-process or as `segvit_jax.main` subprocesses.

A tiny SegViT (2 blocks, 32x32 synthetic images, 3 classes) with dropout and drop-path on keeps
each run to seconds. Subprocesses inherit the test process's environment (tests/conftest.py:
simulated devices, compile flags, the compilation cache), so in-process and subprocess runs
compile the same programs and compare bit for bit.
"""

import json
import os
import sys
import time

from conftest import ROOT  # noqa: E402  pylint: disable=g-import-not-at-top

# Dotted config overrides on top of configs/synthetic.py.
TINY = {
    'batch_size': 8, 'num_train_steps': 6, 'log_every_steps': 1, 'evals.val.every_steps': 0,
    'evals.figure.every_steps': 0, 'checkpoint_every_steps': 3, 'keep_checkpoints': 3,
    'model.img_size': (32, 32), 'model.patch_size': 8, 'model.embed_dim': 32, 'model.depth': 2,
    'model.num_heads': 2, 'model.out_indices': (0, 1), 'model.use_stages': 2,
    'model.drop_path_rate': 0.1, 'model.decoder_dropout': 0.1, 'model.decoder_dim': 16,
    'model.decoder_heads': 2, 'model.decoder_layers': 2, 'model.num_classes': 3,
    'optim.learning_rate': 1e-3, 'optim.warmup_steps': 2,
    'dataset.num_classes': 3, 'dataset.synthetic_image_size': 32,
    'dataset.synthetic_num_train': 20, 'dataset.synthetic_num_val': 6,
    'dataset.crop_size': (32, 32), 'dataset.img_scale': (64, 32),
    'dataset.test_img_scale': (32, 32), 'dataset.eval_pad_size': (32, 32),
    'dataset.eval_label_pad_size': (32, 32), 'dataset.shuffle_buffer': 20,
    'eval.batch_size': 4, 'eval.crop_size': (32, 32), 'eval.mode': 'whole',
}


def env(num_devices=1):
  """Subprocess environment: this process's set-up with `num_devices` devices."""
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess_env(num_devices)


def tiny_config(**overrides):
  """configs/synthetic.py with TINY and `overrides` (dotted keys, or '__' for '.') applied."""
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config()
  values = dict(TINY)
  values.update({k.replace('__', '.'): v for k, v in overrides.items()})
  for key, value in values.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def flag(key, value):
  if isinstance(value, tuple):
    value = '(' + ','.join(str(v) for v in value) + ',)'
  return f'--config.{key}={value}'


def main_cmd(workdir, fault=None, **overrides):
  """The `segvit_jax.main` command of a tiny run; `fault` ('hang_after:3', ...) runs it
  through tests/run_with_faults.py."""
  config = dict(TINY)
  config.update({k.replace('__', '.'): v for k, v in overrides.items()})
  program = (['-m', 'segvit_jax.main'] if fault is None else
             [os.path.join(ROOT, 'tests', 'run_with_faults.py'), f'--fault={fault}'])
  return ([sys.executable, *program, f'--config={ROOT}/configs/synthetic.py',
           f'--workdir={workdir}'] + [flag(k, v) for k, v in config.items()])


def losses(workdir):
  """{step: the last logged record of that step} of metrics.jsonl (train lines)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        out[record['step']] = record
  return out


def steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for(predicate, proc, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      out = proc.stdout.read() if proc.stdout else ''
      raise AssertionError(f'process exited ({proc.returncode}) before {what}:\n{out[-4000:]}')
    time.sleep(0.1)
  proc.kill()
  raise AssertionError(f'timed out waiting for {what}')
