"""Multi-host training as 2 processes on localhost (4 simulated CPU devices each, gloo collectives).

The same tiny run as tests/test_train.py (tests/tiny_runs.py) on 2 processes x 4 devices must
train and evaluate exactly like 1 process x 8 devices: the global batches do not depend on the
number of hosts (input_pipeline), the mesh is data:8 either way, and the confusion matrix is
summed across hosts. Killing one process must end the other instead of leaving it in a collective.
"""

import os
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from segvit_jax.training import eval_mode
from segvit_jax.training import loop

try:
  from tests import tiny_runs  # pylint: disable=g-import-not-at-top
except ImportError:
  import tiny_runs  # pylint: disable=g-import-not-at-top

# Eval batch 20 (configs/synthetic.py's) does not divide over 8 devices: it runs on batches of 24,
# and its metrics must equal those of the 1-device evaluation below.
RUN = dict(num_train_steps=3, checkpoint_every_steps=3, evals__val__every_steps=3,
           eval__batch_size=20)
LOSS_KEYS = ('train/loss', 'train/loss_ce', 'train/loss_mask', 'train/loss_dice',
             'train/loss_ce_0', 'train/loss_mask_0', 'train/loss_dice_0', 'train/grad_norm')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start_pair(workdir, faults=(None, None), **overrides):
  """Starts processes 0 and 1 of a 2-process job; `faults[i]` runs process i with that fault
  (tests/run_with_faults.py)."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = tiny_runs.main_cmd(workdir, fault=faults[i], **overrides) + [
        f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(subprocess.Popen(cmd, cwd=tiny_runs.ROOT, env=tiny_runs.env(4),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout):
  outs = []
  deadline = time.time() + timeout
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(deadline - time.time(), 1))
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _eval_records(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(ln) for ln in f if '"val/miou"' in ln]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tmp_path):
  """Process 1 reaches the first train step 34 s after process 0, longer than CPU collectives
  wait for a peer to set up a program's communicators (30 s): a program's first run waits until
  every process has compiled it. The 1 x 8 run is this test process (8 simulated devices), run
  while the pair waits."""
  workdir = str(tmp_path / 'two')
  procs = _start_pair(workdir, faults=(None, 'slow_input:34'), **RUN)
  single = str(tmp_path / 'single')
  loop.train_and_evaluate(tiny_runs.tiny_config(**RUN), single)
  outs = _finish(procs, 360)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i}:\n{out[-4000:]}'
  assert 'process 1 of 2, 4 local / 8 global CPU devices' in outs[1]
  assert 'fault: the input starts 34 s late' in outs[1]

  one, two = tiny_runs.losses(single), tiny_runs.losses(workdir)
  assert sorted(one) == sorted(two) == [1, 2, 3]
  for step in (1, 2, 3):
    for key in LOSS_KEYS:
      np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-4, err_msg=(step, key))
  e1, e2 = _eval_records(single), _eval_records(workdir)
  assert len(e1) == len(e2) == 1
  for key in ('val/miou', 'val/macc', 'val/aacc'):
    np.testing.assert_allclose(e2[0][key], e1[0][key], rtol=1e-4, err_msg=key)
  assert 0 < e2[0]['val/miou'] <= 1
  # Process 0 alone writes the logs; both processes wrote the checkpoint.
  assert sum(1 for _ in open(os.path.join(workdir, 'metrics.jsonl'))) == \
      sum(1 for _ in open(os.path.join(single, 'metrics.jsonl')))
  assert tiny_runs.steps(workdir) == [3]

  # The 2-process checkpoint restores on one device: --mode=eval of that workdir gives the same
  # metrics.
  eval_dir = str(tmp_path / 'eval')
  eval_mode.evaluate_checkpoint(tiny_runs.tiny_config(**RUN, init_checkpoint=workdir), eval_dir,
                                devices=jax.devices()[:1])
  restored = _eval_records(eval_dir)
  assert len(restored) == 1
  for key in ('val/miou', 'val/macc', 'val/aacc'):
    np.testing.assert_allclose(restored[0][key], e2[0][key], rtol=1e-4, err_msg=key)


@pytest.mark.slow
def test_killing_one_process_ends_the_other(tmp_path):
  """Process 1 stops after its step-2 checkpoint and is SIGKILLed there; process 0 goes on into
  step 3, whose collectives can never complete: it must exit with an error, not hang."""
  workdir = str(tmp_path / 'killed')
  procs = _start_pair(workdir, faults=(None, 'hang_after:2'), num_train_steps=6,
                      checkpoint_every_steps=2)
  try:
    tiny_runs.wait_for(lambda: 2 in tiny_runs.steps(workdir), procs[1], 300,
                       'the step-2 checkpoint')
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, _ = procs[0].communicate(timeout=180)
    waited = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  procs[1].wait(timeout=30)
  assert procs[1].returncode == -signal.SIGKILL
  assert procs[0].returncode != 0, out[-4000:]
  assert waited < 120, waited
  # The survivor says why: JAX's coordination service names the dead task, or, when a
  # collective in flight notices first, Gloo names the closed connection to it.
  reasons = [ln for ln in out.splitlines()
             if re.match(r'[EF]\d{4} ', ln) or 'Gloo' in ln and 'failed' in ln]
  print(f'process 0 exited {procs[0].returncode} {waited:.1f} s after process 1 was killed:\n' +
        '\n'.join(reasons[-6:]))
  assert any('another task died' in ln or 'stopped sending heartbeats' in ln
             or 'Connection closed by peer' in ln for ln in reasons), out[-4000:]
  assert 2 in tiny_runs.steps(workdir)  # the job can restart from the last checkpoint


@pytest.mark.slow
def test_an_exception_on_one_process_ends_the_job(tmp_path):
  """Process 1 raises after step 2: it reports the error and leaves at once (no shutdown barrier),
  and process 0, waiting in step 3's collectives, ends on that report, before the coordination
  service would miss process 1's heartbeats."""
  workdir = str(tmp_path / 'raised')
  procs = _start_pair(workdir, faults=('raise_after:2',) * 2, num_train_steps=6,
                      checkpoint_every_steps=0)
  start = time.time()
  outs = _finish(procs, 240)
  waited = time.time() - start
  assert procs[1].returncode == 1, outs[1][-4000:]
  assert 'ERROR on process 1 of 2; ending the job' in outs[1]
  assert 'fault: failing on purpose after step 2' in outs[1]
  assert procs[0].returncode == 1, outs[0][-4000:]
  assert 'error: process 1 of 2 failed (its log says why); ending process 0.' in outs[0], \
      outs[0][-4000:]
  assert 'stopped sending heartbeats' not in outs[0]
  print(f'both processes ended {waited:.1f} s after the start')
