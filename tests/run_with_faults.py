"""`python tests/run_with_faults.py --fault=KIND:N [segvit_jax.main flags]`: main with a fault.

  hang_after:N   after step N's checkpoint is on disk, wait for SIGTERM / SIGINT (or SIGKILL)
  raise_after:N  after step N, raise RuntimeError on the last process of the job
  slow_input:S   the last process's training input takes S seconds longer to start (slow
                 storage, a loaded host), so it reaches the first train step that much later

The faults are the trainer's `after_step` hook or a wrapped input pipeline, so the product
carries no test switches.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segvit_jax import input_pipeline  # noqa: E402
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


def slow_input(seconds, create_train_dataset, *args, **kwargs):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == jax.process_count() - 1:
    print(f'fault: the input starts {seconds} s late', flush=True)
    time.sleep(seconds)
  return create_train_dataset(*args, **kwargs)


if __name__ == '__main__':
  kind, n = sys.argv.pop(1).removeprefix('--fault=').split(':')
  if kind == 'slow_input':
    input_pipeline.create_train_dataset = functools.partial(
        slow_input, int(n), input_pipeline.create_train_dataset)
  else:
    hook = functools.partial({'hang_after': hang_after, 'raise_after': raise_after}[kind], int(n))
    train.train_and_evaluate = functools.partial(train.train_and_evaluate, after_step=hook)
  main.run()
