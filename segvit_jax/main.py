r"""Command line: train (resuming by itself) or evaluate a SegViT.

  python -m segvit_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m segvit_jax.main --config=configs/ade20k_large.py --workdir=/ckpt/ade \
      --config.batch_size=16 --config.mesh=data:4,model:2
  python -m segvit_jax.main --config=configs/ade20k_large.py --workdir=/tmp/eval --mode=eval \
      --config.init_checkpoint=/ckpt/segvit_ade20k_large_converted

Any config key can be overridden as --config.key=value. In train mode the run continues from the
latest checkpoint in WORKDIR/checkpoints if there is one. Exit codes: 0 when done or preempted
(SIGTERM: the current step is saved first), 1 when the loss became non-finite.
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TensorFlow only feeds the input pipeline: keep it off any accelerator.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  import jax  # pylint: disable=g-import-not-at-top
  from segvit_jax import distributed  # pylint: disable=g-import-not-at-top
  from segvit_jax import train  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e

  config = _CONFIG.value
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s).', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    if _MODE.value == 'eval':
      train.evaluate_checkpoint(config, _WORKDIR.value)
      return
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except train.NonFiniteLossError as e:
    logging.error('%s', e)
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    _exit(1)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    print(f'ERROR on process {jax.process_index()} of {jax.process_count()}; ending the job:\n'
          f'{traceback.format_exc()}', file=sys.stderr, flush=True)
    _exit(1)
  if jax.process_index() == 0:
    _print_summary(result, _WORKDIR.value, int(config.get('num_prediction_images', 0)))


def _exit(code: int) -> None:
  """sys.exit, except in a multi-process job: there, leave without jax.distributed's shutdown
  barrier, where this process would wait for the others while they wait for it in a collective;
  once it is gone, the coordination service ends the others with an error naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _print_summary(result: dict, workdir: str, config_num_predictions: int) -> None:
  """Last lines of a run, after the library logs: where it stopped and what it wrote."""
  if 'preempted_at_step' in result:
    print(f'Preempted at step {result["preempted_at_step"]}; rerun the same command to resume.')
    return
  if 'eval/miou' in result:
    print(f'Validation: mIoU {result["eval/miou"]:.4f}, mAcc {result["eval/macc"]:.4f}, '
          f'aAcc {result["eval/aacc"]:.4f} ({workdir}/final_metrics.json)')
  if 'eval/miou' in result and config_num_predictions > 0:
    print(f'Predictions: {os.path.join(workdir, "predictions.png")}')


def run():
  """The `segvit-train` console script."""
  app.run(main)


if __name__ == '__main__':
  run()
