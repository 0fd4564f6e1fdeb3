"""The analysis of a config on a target: check, compile the train and eval steps, measure them.

`analyse` returns what `segvit-compile --json` prints: the target's figures, the mesh, and per
step the batch, memory per chip, FLOPs and bytes, and the roofline (and, on request, the largest
train batch that fits). Progress lines go to stderr.
"""

import dataclasses
import math
import os
import sys
from typing import Optional

import jax
import ml_collections

from segvit_jax import sharding
from segvit_jax.aot import flops
from segvit_jax.aot import max_batch
from segvit_jax.aot import measure
from segvit_jax.aot import programs as programs_lib
from segvit_jax.aot import targets
from segvit_jax.aot.report import format_gib
from segvit_jax.training import preflight


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _progress_done(report: measure.StepReport) -> None:
  memory = f', {format_gib(report.total_gib)} per chip' if report.total_gib is not None else ''
  _progress(f'  compiled in {report.compile_s:.1f} s{memory}'
            + ('' if report.fits else ': does not fit'))


def _with_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  return config


def _compile_train(config, devices, plan: preflight.Plan, usable: Optional[float]):
  programs = programs_lib.build_programs(config, devices)
  train_batch, _ = programs_lib.abstract_batches(config, programs.mesh, config.batch_size, 1)
  _progress(f'compiling the train step: batch {config.batch_size} ({plan.train_batch_per_shard} '
            f'per data shard), {tuple(config.dataset.crop_size)} crops ...')
  with jax.set_mesh(programs.mesh), sharding.axis_rules():
    report = measure.compile_step(programs.train_step, (programs.state, train_batch), usable)
  report.state_gib = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                         for x in jax.tree.leaves(programs.state)) / measure.GIB
  _progress_done(report)
  return programs, report


def _compile_eval(config, programs: programs_lib.Programs, plan: preflight.Plan,
                  usable: Optional[float]):
  _, eval_batch = programs_lib.abstract_batches(config, programs.mesh, 1, plan.eval_batch_size)
  confusion = programs_lib.abstract_confusion(config, programs.mesh)
  variables = {'params': programs.eval_params}
  views = sum(n for _, n in flops.eval_forwards(config))
  _progress(f'compiling the eval step: batch {plan.eval_batch_size} ({plan.eval_batch_per_shard} '
            f'per data shard), bucket {tuple(config.dataset.eval_pad_size)}, {views} model '
            f'call(s) per image ({config.eval.mode}) ...')
  with jax.set_mesh(programs.mesh), sharding.axis_rules():
    report = measure.compile_step(programs.eval_step, (variables, eval_batch, confusion), usable)
  _progress_done(report)
  return report


def analyse(config: ml_collections.ConfigDict, target: targets.Target, *, with_eval: bool = True,
            find_max_batch: bool = False) -> dict:
  """Checks, compiles and measures `config` on `target`: the --json object (see module doc).

  `with_eval=False` compiles the train step only ('eval' is then None).
  """
  plan = preflight.check(config, num_devices=target.chips, process_count=target.processes)
  devices = targets.target_devices(target)
  chip = target.chip
  usable = chip.usable_hbm_gib if chip else _host_memory_gib() / target.chips
  programs, train = _compile_train(config, devices, plan, usable)
  train_flops, eval_flops = flops.model_flops_per_chip(
      config, target.chips, train_batch=config.batch_size, eval_batch=plan.eval_batch_size)
  measure.add_roofline(train, train_flops, chip)
  evaluation = None
  if with_eval:
    evaluation = _compile_eval(config, programs, plan, usable)
    measure.add_roofline(evaluation, eval_flops, chip)
  result = {
      'topology': target.name, 'chips': target.chips, 'processes': target.processes,
      'device_kind': devices[0].device_kind,
      'hbm_gib': chip.hbm_gib if chip else None, 'usable_hbm_gib': usable,
      'peak_flops_per_s': chip.peak_flops if chip else None,
      'hbm_bytes_per_s': chip.hbm_bytes_per_s if chip else None,
      'mesh': plan.mesh, 'attention': programs.attention,
      'train': {'batch_size': int(config.batch_size),
                'batch_per_shard': plan.train_batch_per_shard, **dataclasses.asdict(train)},
      'eval': evaluation and {'batch_size': plan.eval_batch_size,
                              'batch_per_shard': plan.eval_batch_per_shard,
                              **dataclasses.asdict(evaluation)},
  }
  if find_max_batch:
    result['max_batch'] = _find_max_batch(config, devices, plan, train, usable)
  return result


def _find_max_batch(config, devices, plan: preflight.Plan, first: measure.StepReport,
                    usable: float) -> dict:
  """{'per_shard', 'global', 'compiles': [[per-shard batch, total GiB, fits]]}."""
  shards = plan.batch_shards
  unit = int(config.optim.grad_accum_steps)

  def measure_batch(per_shard: int) -> tuple:
    candidate = _with_batch(config, per_shard * shards)
    preflight.check(candidate, num_devices=len(devices), process_count=1)
    _, report = _compile_train(candidate, devices, dataclasses.replace(
        plan, train_batch_per_shard=per_shard), usable)
    return report.total_gib, report.fits

  best, log = max_batch.search_max_batch(measure_batch, plan.train_batch_per_shard,
                                         (first.total_gib, first.fits), usable, unit)
  return {'per_shard': best, 'global': best * shards,
          'compiles': [[b, total, fits] for b, (total, fits) in sorted(log.items())]}


def _host_memory_gib() -> float:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / measure.GIB
