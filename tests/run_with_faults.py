"""`python tests/run_with_faults.py --fault=KIND:N [segvit_jax.main flags]`: main with a fault.

  hang_after:N   after step N's checkpoint is on disk, wait for SIGTERM / SIGINT (or SIGKILL)
  raise_after:N  after step N, raise RuntimeError on the last process of the job
  fill_after:N:B after step N's checkpoint is on disk, leave room for B more bytes of files: on a
                 small file system (a tmpfs a test mounted) a file WORKDIR/../filler takes the
                 rest of its space; elsewhere as limit_after
  limit_after:N:B after step N's checkpoint is on disk, an OS limit of B bytes per file
                 (RLIMIT_FSIZE): a write past it fails with EFBIG ("File too large")
  slow_input:S   the last process's training input takes S seconds longer to start (slow
                 storage, a loaded host), so it reaches the first train step that much later

The faults are the trainer's `after_step` hook or a wrapped input pipeline, so the product
carries no test switches.
"""

import functools
import os
import resource
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segvit_jax.data import input_pipeline  # noqa: E402
from segvit_jax import main  # noqa: E402
from segvit_jax.training import train  # noqa: E402


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


def fill_after(n, room, step, ckpt, stop):
  if step != n:
    return
  ckpt.wait()
  workdir = os.path.dirname(ckpt.directory)
  usage = shutil.disk_usage(workdir)
  if usage.total >= 256 << 20:
    limit_after(n, room, step, ckpt, stop)
    return
  with open(os.path.join(os.path.dirname(workdir), 'filler'), 'wb') as f:
    f.write(bytes(max(usage.free - room, 0)))
  print(f'fault: {shutil.disk_usage(workdir).free} bytes left on the file system', flush=True)


def limit_after(n, room, step, ckpt, stop):
  del stop
  if step != n:
    return
  ckpt.wait()
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  print(f'fault: files limited to {room} bytes', flush=True)


def slow_input(seconds, create_train_dataset, *args, **kwargs):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == jax.process_count() - 1:
    print(f'fault: the input starts {seconds} s late', flush=True)
    time.sleep(seconds)
  return create_train_dataset(*args, **kwargs)


if __name__ == '__main__':
  kind, *values = sys.argv.pop(1).removeprefix('--fault=').split(':')
  values = [int(v) for v in values]
  if kind == 'slow_input':
    input_pipeline.create_train_dataset = functools.partial(
        slow_input, *values, input_pipeline.create_train_dataset)
  else:
    hook = functools.partial({'hang_after': hang_after, 'raise_after': raise_after,
                              'fill_after': fill_after, 'limit_after': limit_after}[kind],
                             *values)
    train.train_and_evaluate = functools.partial(train.train_and_evaluate, after_step=hook)
  main.run()
