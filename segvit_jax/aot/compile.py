r"""Compile a run's train and eval steps for a TPU slice you do not have: memory, FLOPs, roofline.

  python -m segvit_jax.aot.compile --config=configs/ade20k_large.py --topology=v4-32 \
      --config.batch_size=16
  python -m segvit_jax.aot.compile --config=configs/ade20k_base.py --topology=v5litepod-4 --json
  python -m segvit_jax.aot.compile --config=configs/ade20k_large.py --topology=v5litepod-16 \
      --find_max_batch --train_only

--topology is a Cloud TPU type as gcloud names it (v4-8 ... v4-4096 and v5p-8 ... count
TensorCores, two per chip; v5litepod-1 ... -256 and v6e-1 ... -256 count chips), libtpu's own
form ('v5e:4x4', 'v4:2x2x4'), or cpu:N (N simulated CPU devices). TPU targets need libtpu
importable (pip install -r requirements-tpu.txt); nothing runs, and no TPU is needed.

The tool checks the config against the slice (`segvit_jax.training.preflight`), then compiles what a run
compiles, from shapes only (nothing is allocated): the train step and the eval step with the
config's mesh, batch sizes, dtype and remat; the eval step on one eval batch of the padded eval
bucket (config.dataset.eval_pad_size), every sliding window and TTA view included. Per chip it
prints: argument / temporary / total memory against the chip's HBM and whether it fits; FLOPs and
HBM bytes per step; the compile time; and a roofline lower bound on the step time,
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), with the peaks it used.

FLOPs and bytes are XLA's cost analysis of the optimised per-chip program (`segvit_jax.aot.hlo_cost`),
with every loop body (scanned layers, sliding windows, per-head attention) counted as often as the
loop runs (XLA's own figure counts a loop body once) and Pallas kernels counted by their cost
estimates. The memory term counts HBM bytes: what the compiler keeps in on-chip memory (CMEM on
v4 and v5p, VMEM) is read and written there, and only the copies in and out of it reach HBM;
'bytes' in --json is everything the program reads and writes, on-chip memory included. The compute
term of the roofline uses the larger of that count and the model's FLOPs (kernels without a cost
estimate count none in XLA's analysis). roofline_mfu = (model FLOPs / peak) / roofline bound,
where model FLOPs are `segvit_jax.aot.flops`'s count of the model's multiply-adds (x 2 FLOPs), x 3
for a train step, so recomputation (remat) does not count as work.

Exit 1 with `error: ...` when the config does not divide over the slice or a step does not fit.
"""

import json

from absl import flags
import jax
from ml_collections import config_flags

from segvit_jax import cli
from segvit_jax.aot import analysis
from segvit_jax.aot import report
from segvit_jax.aot import targets
from segvit_jax.errors import UserError


def main(argv) -> int:
  """Compiles the config for the target, prints the report (or --json); exit 1 if a step does
  not fit."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: every option is --name=value.')
  config = cli.config_value(flags.FLAGS['config'])
  if config is None or not flags.FLAGS['topology'].value:
    raise UserError('--config=configs/X.py and --topology=NAME (v4-32, v5litepod-16, ..., '
                    'cpu:N) are required.')
  target = targets.parse_topology(flags.FLAGS['topology'].value)
  jax.config.update('jax_platforms', 'cpu')  # compiles for the target; runs nothing
  if target.chip is None:
    jax.config.update('jax_num_cpu_devices', target.chips)
  result = analysis.analyse(config, target, with_eval=not flags.FLAGS['train_only'].value,
                            find_max_batch=flags.FLAGS['find_max_batch'].value)
  if flags.FLAGS['json'].value:
    print(json.dumps(result))
  else:
    print(report.format_report(result, target.chip))
  problem = report.does_not_fit(result, target.chip)
  if problem:
    raise UserError(problem)
  return 0


def _define_flags() -> None:
  # Defined by `run` only, so that importing this module next to another CLI in one process
  # does not redefine --config.
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py); override keys '
                                  'with --config.key=value.', lock_config=True)
  flags.DEFINE_string('topology', None, 'Cloud TPU type (v4-32, v5litepod-16, v5p-8, v6e-8, '
                      '...), libtpu topology (v5e:4x4), or cpu:N.')
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of the report.')
  flags.DEFINE_bool('find_max_batch', False, 'Also find the largest train batch that fits.')
  flags.DEFINE_bool('train_only', False, 'Compile the train step only (no eval step).')


def run() -> None:
  """Console-script entry point."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
