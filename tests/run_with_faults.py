"""`python tests/run_with_faults.py --fault=KIND:N [segvit_jax.main flags]`: main with a fault.

  hang_after:N   after step N (and its checkpoint, when the step saves one, on disk), wait for
                 SIGTERM / SIGINT (or SIGKILL)
  raise_after:N  after step N, raise RuntimeError on the last process of the job
  fill_after:N:B after step N's checkpoint is on disk, leave room for B more bytes of files: on a
                 small file system (a tmpfs a test mounted) a file WORKDIR/../filler takes the
                 rest of its space; elsewhere as limit_after
  limit_after:N:B after step N's checkpoint is on disk, an OS limit of B bytes per file
                 (RLIMIT_FSIZE): a write past it fails with EFBIG ("File too large")
  slow_input:S   the last process's training input takes S seconds longer to start (slow
                 storage, a loaded host), so it reaches the first train step that much later

The faults come in through the trainer's real interfaces, so the product carries no test hooks:
the training input, and the signal handlers it installs. The loop asks for the batch of step
N + 1 after it has started step N's save and before it checks for a stop signal, so the iterator
that `input_pipeline.global_batches` returns for the training data is wrapped here, in the loop's
own thread (not in a prefetching host iterator), and the fault happens when that batch is asked
for: first the wait until WORKDIR/checkpoints/N is committed (a directory named N, no
`.orbax-checkpoint-tmp` suffix), then the fault. Each fault prints a line `fault: ...`, which the
tests wait for.
"""

import os
import resource
import shutil
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from segvit_jax import main  # noqa: E402
from segvit_jax.checkpoint import training_checkpoints  # noqa: E402
from segvit_jax.data import input_pipeline  # noqa: E402
from segvit_jax.training import loop  # noqa: E402

_CHECKPOINT_TIMEOUT_S = 300


class StopSignals:
  """Records SIGTERM / SIGINT and passes each on to the handler it found (the trainer's
  StopRequest, read with signal.getsignal). Installed in the main thread, after the trainer's."""

  def __init__(self):
    self.arrived = threading.Event()
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self.arrived.set()
    previous = self._previous[signum]
    if callable(previous):
      previous(signum, frame)


def hang(n, run):
  print(f'fault: waiting after step {n}', flush=True)
  while not run.signals.arrived.is_set():
    time.sleep(0.05)


def raise_on_last_process(n, run):
  del run
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == jax.process_count() - 1:
    raise RuntimeError(f'fault: failing on purpose after step {n}.')


def fill_disk(n, room, run):
  usage = shutil.disk_usage(run.workdir)
  if usage.total >= 256 << 20:
    limit_file_size(n, room, run)
    return
  with open(os.path.join(os.path.dirname(run.workdir), 'filler'), 'wb') as f:
    f.write(bytes(max(usage.free - room, 0)))
  print(f'fault: {shutil.disk_usage(run.workdir).free} bytes left on the file system', flush=True)


def limit_file_size(n, room, run):
  del n, run
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  print(f'fault: files limited to {room} bytes', flush=True)


FAULTS = {'hang_after': hang, 'raise_after': raise_on_last_process, 'fill_after': fill_disk,
          'limit_after': limit_file_size}


class FaultyRun:
  """Wraps the training input of `segvit_jax.main`'s run so that `fault(n, *values, self)` happens
  when the loop asks for the batch of step n + 1."""

  def __init__(self, kind, n, *values):
    self.fault = lambda: FAULTS[kind](n, *values, self)
    self.n = n
    self.workdir = None
    self.signals = None
    self._train = None  # (config, start step, host batches) of the training input
    self._create_train_dataset = input_pipeline.create_train_dataset
    self._global_batches = input_pipeline.global_batches
    input_pipeline.create_train_dataset = self.create_train_dataset
    input_pipeline.global_batches = self.global_batches

  def create_train_dataset(self, config, **kwargs):
    host_batches = self._create_train_dataset(config, **kwargs)
    self._train = (config, int(kwargs.get('start_step', 0)), host_batches)
    return host_batches

  def global_batches(self, host_batches, *args, **kwargs):
    batches = self._global_batches(host_batches, *args, **kwargs)
    if self._train is None or host_batches is not self._train[2]:
      return batches  # an evaluator's
    self.workdir = os.path.abspath(flags.FLAGS.workdir)
    self.signals = StopSignals()  # now: the trainer has installed its handlers
    return self._batches(batches)

  def _batches(self, batches):
    """`batches`, with the fault before the batch of step n + 1 is taken from them."""
    config, start, _ = self._train
    step = start + 1  # of the next batch
    while True:
      if step == self.n + 1:
        if loop.itstime(self.n, int(config.checkpoint_every_steps),
                        int(config.num_train_steps)):
          self._wait_for_checkpoint()
        self.fault()
      try:
        batch = next(batches)
      except StopIteration:
        return
      yield batch
      step += 1

  def _wait_for_checkpoint(self):
    path = os.path.join(training_checkpoints.checkpoint_dir(self.workdir), str(self.n))
    deadline = time.time() + _CHECKPOINT_TIMEOUT_S
    while not os.path.isdir(path):
      if time.time() > deadline:
        raise RuntimeError(f'fault: {path} was not committed in {_CHECKPOINT_TIMEOUT_S} s.')
      time.sleep(0.05)


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
    original = input_pipeline.create_train_dataset
    input_pipeline.create_train_dataset = (
        lambda *args, **kwargs: slow_input(values[0], original, *args, **kwargs))
  else:
    FaultyRun(kind, *values)
  main.run()
