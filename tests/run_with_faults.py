"""`python tests/run_with_faults.py --fault=KIND:N [segvit_jax.main flags]`: main with a fault.

  hang_after:N   after step N's checkpoint is on disk, wait for SIGTERM / SIGINT (or SIGKILL)
  raise_after:N  after step N, raise RuntimeError on the last process of the job

The fault is the trainer's `after_step` hook, so the product carries no test switches.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segvit_jax import main  # noqa: E402
from segvit_jax import train  # noqa: E402


def hang_after(n, step, ckpt, stop):
  if step == n:
    ckpt.wait()
    print(f'fault: waiting after step {n}', flush=True)
    while not stop.event.is_set():
      time.sleep(0.05)


def raise_after(n, step, ckpt, stop):
  del ckpt, stop
  import jax  # pylint: disable=g-import-not-at-top
  if step == n and jax.process_index() == jax.process_count() - 1:
    raise RuntimeError(f'fault: failing on purpose after step {n}.')


if __name__ == '__main__':
  kind, n = sys.argv.pop(1).removeprefix('--fault=').split(':')
  hook = functools.partial({'hang_after': hang_after, 'raise_after': raise_after}[kind], int(n))
  train.train_and_evaluate = functools.partial(train.train_and_evaluate, after_step=hook)
  main.run()
