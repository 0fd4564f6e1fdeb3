r"""Command line: train (resuming by itself) or evaluate a SegViT.

  python -m segvit_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m segvit_jax.main --config=configs/ade20k_large.py --workdir=/ckpt/ade \
      --config.batch_size=16 --config.mesh=data:4,model:2
  python -m segvit_jax.main --config=configs/ade20k_large.py --workdir=/tmp/eval --mode=eval \
      --config.init_checkpoint=/ckpt/segvit_ade20k_large_converted

Any config key can be overridden as --config.key=value. In train mode the run continues from the
latest checkpoint in WORKDIR/checkpoints if there is one. Exit status: 0 when done or preempted
(SIGTERM: the current step is saved first), 130 after Ctrl-C (the current step is saved first;
a second Ctrl-C stops at once), 1 for a configuration or input the run cannot use (one line
`error: ...`, before anything is compiled), when the loss became non-finite and when a file of
the run could not be written (a full disk: one line; the workdir keeps its last complete
checkpoint, from which the same command continues).
"""

import os
import shutil
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from segvit_jax import cli
from segvit_jax import fileio
from segvit_jax.errors import StorageError
from segvit_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py); override keys with --config.key=v.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (and evaluate) resuming from WORKDIR; eval: evaluate '
                          'config.init_checkpoint (or WORKDIR\'s latest checkpoint) only.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process jobs: HOST:PORT of process 0 (as '
    'jax.distributed.initialize). TPU VM slices and SLURM jobs are detected without it.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process jobs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process jobs: this process, 0-based.')


def _print_summary(result: dict) -> None:
  """The last lines of a run: where it stopped and what it wrote."""
  if result.get('stopped_by'):
    return  # the loop said where it saved
  miou = next((k for k in result if k.endswith('/miou')), None)
  if miou:
    name = miou[:-len('/miou')]
    where = f' ({result["metrics_file"]})' if result.get('metrics_file') else ''
    print(f'Validation: mIoU {result[miou]:.4f}, mAcc {result[name + "/macc"]:.4f}, '
          f'aAcc {result[name + "/aacc"]:.4f} at step {result["step"]}{where}', flush=True)
  if result.get('figure_file'):
    print(f'Predictions: {result["figure_file"]}', flush=True)


def _exit(code: int) -> None:
  """sys.exit, except in a multi-process job: there, leave without jax.distributed's shutdown
  barrier, where this process would wait for the others while they wait for it in a collective;
  once it is gone, the coordination service ends the others with an error naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _start_jax(config) -> None:
  """jax.distributed joined, the config checked against the devices and processes: all before
  anything is compiled."""
  import jax  # pylint: disable=g-import-not-at-top
  from segvit_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    raise UserError(str(e)) from e
  print(f'JAX {jax.__version__}: process {jax.process_index()} of {jax.process_count()}, '
        f'{jax.local_device_count()} local / {jax.device_count()} global '
        f'{jax.devices()[0].platform.upper()} devices.', flush=True)
  from segvit_jax.training import preflight  # pylint: disable=g-import-not-at-top
  preflight.check(config, num_devices=jax.device_count(), process_count=jax.process_count())
  from segvit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.pipeline_for(config)  # a file source without TensorFlow: say so now


def _run(config, workdir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import eval_mode  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import loop  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import step  # pylint: disable=g-import-not-at-top
  try:
    if _MODE.value == 'eval':
      return eval_mode.evaluate_checkpoint(config, workdir)
    return loop.train_and_evaluate(config, workdir)
  except (step.NonFiniteLossError, StorageError) as e:
    # Raised mid-run, possibly on this process alone; the workdir is kept as it is.
    print(f'error: {e}', file=sys.stderr, flush=True)
    _exit(1)
  except (UserError, KeyboardInterrupt):
    raise
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    from segvit_jax import distributed  # pylint: disable=g-import-not-at-top
    first = distributed.report_failure()
    if first is None:
      print(f'ERROR on process {jax.process_index()} of {jax.process_count()}; ending the job:\n'
            f'{traceback.format_exc()}', file=sys.stderr, flush=True)
    else:  # e.g. a collective that lost its peer: the other process's log has the cause
      print(distributed.failure_line(first, jax.process_index()), file=sys.stderr, flush=True)
    _exit(1)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: every option is --name=value.')
  config, workdir = cli.config_value(_CONFIG), _WORKDIR.value
  if config is None or not workdir:
    raise UserError('--config=configs/X.py and --workdir=DIR are required.')
  cli.check_writable_dir(workdir, '--workdir')
  existed = fileio.exists(workdir)
  try:
    _start_jax(config)
    result = _run(config, workdir)
  except UserError:
    if not existed and not fileio.is_url(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # leave no half-made workdir behind
    raise
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    _print_summary(result)
  return cli.EXIT_INTERRUPTED if result.get('stopped_by') == 'SIGINT' else 0


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
