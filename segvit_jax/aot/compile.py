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
where model FLOPs are `segvit_jax.aot.summary`'s count of the model's multiply-adds (x 2 FLOPs), x 3
for a train step, so recomputation (remat) does not count as work.

Exit 1 with `error: ...` when the config does not divide over the slice or a step does not fit.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional

from absl import flags
import jax
import jax.extend
from jax.experimental import topologies
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from segvit_jax import cli
from segvit_jax.evaluation import inference
from segvit_jax.aot import hlo_cost
from segvit_jax.training import preflight
from segvit_jax import sharding
from segvit_jax.aot import summary
from segvit_jax.errors import UserError

GIB = 2.0**30


# ---------------------------------------------------------------------------------------------
# Targets.


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation."""
  generation: str  # libtpu's topology prefix
  hbm_gib: float  # published HBM capacity
  usable_hbm_gib: float  # what XLA lets one program use (its out-of-memory message)
  peak_flops: float  # dense bf16 FLOP/s, 2 per multiply-add
  hbm_bytes_per_s: float
  chip_config: str  # 'megacore': one JAX device per chip (v4 and v5p chips have 2 TensorCores)
  cores_per_chip: int  # what the gcloud type counts per chip
  dims: int  # torus dimensions
  sizes: tuple  # chip counts of the slices the gcloud types name


# Published per-chip figures (Google Cloud TPU documentation, cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e: "Peak compute per chip (bf16)", "HBM capacity", "HBM bandwidth"). Usable HBM: the
# capacity XLA reports when a program does not fit (libtpu 0.0.42, measured).
CHIPS = {
    'v4': Chip('v4', 32, 30.75, 275e12, 1200e9, 'megacore', 2, 3,
               tuple(2**k for k in range(2, 13))),
    'v5litepod': Chip('v5e', 16, 15.75, 197e12, 819e9, 'default', 1, 2,
                      (1, 4, 8, 16, 32, 64, 128, 256)),
    'v5p': Chip('v5p', 95, 95.74, 459e12, 2765e9, 'megacore', 2, 3,
                tuple(2**k for k in range(2, 13))),
    'v6e': Chip('v6e', 32, 31.25, 918e12, 1638e9, 'default', 1, 2,
                (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {'v5e': 'v5litepod', 'v5lite': 'v5litepod'}
_BY_GENERATION = {chip.generation: name for name, chip in CHIPS.items()}
_HOST_BOUNDS = (2, 2, 1)  # chips per VM of multi-host slices
_SINGLE_HOST_CHIPS = 8  # 2-D slices up to 2x4 are one VM


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for: a TPU slice (`chip` set) or N CPU devices (`chip` None)."""
  name: str
  chips: int
  processes: int
  chip: Optional[Chip] = None
  topology: str = ''  # libtpu's name, e.g. 'v4:2x2x4'
  host_bounds: tuple = (1, 1, 1)  # chips per host along each axis


def _slice_shape(chips: int, dims: int) -> list:
  """Cloud TPU's default slice shape: double the smallest side, the later one on ties."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    side = min(reversed(range(dims)), key=lambda i: shape[i])
    shape[side] *= 2
  return shape


def _tpu_target(name: str, chip: Chip, shape: list) -> Target:
  chips = math.prod(shape)
  shape3 = (*shape, 1)[:3]
  if chip.dims == 2 and chips <= _SINGLE_HOST_CHIPS:
    bounds = shape3
  else:
    bounds = tuple(min(b, s) for b, s in zip(_HOST_BOUNDS, shape3))
  processes = chips // math.prod(bounds)
  topology = f'{chip.generation}:{"x".join(str(s) for s in shape)}'
  return Target(name=name, chips=chips, processes=processes, chip=chip, topology=topology,
                host_bounds=bounds)


def parse_topology(name: str) -> Target:
  """'v4-32' / 'v5litepod-16' / 'v5e:4x4' / 'cpu:8' -> Target; UserError for anything else."""
  known = ', '.join(f'{n}-N' for n in CHIPS)
  text = name.strip().lower()
  if text.startswith('cpu:'):
    n = text[4:]
    if not n.isdigit() or int(n) < 1:
      raise UserError(f'--topology={name!r}: cpu:N wants a positive device count, e.g. cpu:8.')
    return Target(name=text, chips=int(n), processes=1)
  if ':' in text:  # libtpu's form
    generation, _, dims = text.partition(':')
    if generation not in _BY_GENERATION or not re.fullmatch(r'\d+(x\d+)+', dims):
      raise UserError(f'--topology={name!r} is not a TPU type: use one of {known}, a libtpu '
                      f'topology such as v5e:4x4 or v4:2x2x4, or cpu:N.')
    chip = CHIPS[_BY_GENERATION[generation]]
    shape = [int(s) for s in dims.split('x')]
    if len(shape) != chip.dims:
      raise UserError(f'--topology={name!r}: {generation} slices have {chip.dims} dimensions.')
    return _tpu_target(text, chip, shape)
  family, _, count = text.rpartition('-')
  family = _ALIASES.get(family, family)
  if family not in CHIPS or not count.isdigit():
    raise UserError(f'--topology={name!r} is not a TPU type: use one of {known} (as gcloud '
                    'names them, e.g. v4-32, v5litepod-16), or cpu:N.')
  chip = CHIPS[family]
  cores = int(count)
  chips, extra = divmod(cores, chip.cores_per_chip)
  if extra or chips not in chip.sizes:
    sizes = ', '.join(f'{family}-{s * chip.cores_per_chip}' for s in chip.sizes[:6])
    raise UserError(f'--topology={name!r} is not a {family} slice: use {sizes}, ...')
  return _tpu_target(text, chip, _slice_shape(chips, chip.dims))


def target_devices(target: Target) -> list:
  """The target's devices, for compilation only (TPU devices come from libtpu's topology)."""
  if target.chip is None:
    devices = jax.devices('cpu')
    if len(devices) < target.chips:
      raise UserError(f'--topology={target.name}: this process has {len(devices)} CPU devices; '
                      'run the tool in a fresh process (it sets the count before JAX starts).')
    return devices[:target.chips]
  if importlib.util.find_spec('libtpu') is None:
    raise UserError(f'--topology={target.name} needs libtpu: pip install -r requirements-tpu.txt '
                    '(or pip install --target=DIR -r requirements-tpu.txt and PYTHONPATH=DIR).')
  # Without these libtpu looks for a TPU VM's metadata and prints warnings; they name the
  # target, which is what the compilation is for.
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', target.name)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  topology = topologies.get_topology_desc(
      platform='tpu', topology_name=target.topology, chip_config_name=target.chip.chip_config,
      chips_per_host_bounds=target.host_bounds, num_slices=1)
  devices = list(topology.devices)
  if len(devices) != target.chips:
    raise RuntimeError(f'{target.topology}: libtpu gave {len(devices)} devices, expected '
                       f'{target.chips}.')
  return devices


# ---------------------------------------------------------------------------------------------
# The programs a run compiles. (The one place that knows how segvit_jax.training builds them.)


@dataclasses.dataclass
class Programs:
  mesh: Any
  state: Any  # abstract train state, leaves carrying their shardings
  eval_params: Any  # abstract parameters as evaluations get them (the model's layout)
  train_step: Any  # jitted (state, batch) -> (state, metrics)
  eval_step: Any  # jitted (variables, batch, confusion) -> confusion
  attention: str  # which attention the ViT blocks use in these programs


def build_programs(config: ml_collections.ConfigDict, devices) -> Programs:
  """The train and eval steps of a run of `config` on `devices`, as the trainer builds them."""
  from segvit_jax.evaluation import eval_loop  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import build  # pylint: disable=g-import-not-at-top
  from segvit_jax.training import step  # pylint: disable=g-import-not-at-top
  run = build.setup(config, devices)
  train_step = step.make_train_step(run.model, run.tx, run.schedule, config, run.mesh, run.spec)
  eval_step = jax.jit(
      eval_loop.make_eval_step(run.model, inference.InferenceSpec.from_config(config)),
      out_shardings=sharding.replicated(run.mesh))
  eval_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             run.spec.abstract.params, run.spec.model_params)
  return Programs(mesh=run.mesh, state=run.spec.abstract, eval_params=eval_params,
                  train_step=train_step, eval_step=eval_step, attention=run.model.attention)


def _abstract_batches(config: ml_collections.ConfigDict, mesh, train_batch: int,
                      eval_batch: int):
  """Shapes (with shardings) of a train batch and an eval batch, as input_pipeline makes them."""

  def array(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

  d = config.dataset
  ch, cw = d.crop_size
  (ih, iw), (lh, lw) = d.eval_pad_size, d.eval_label_pad_size
  train = {'image': array((train_batch, ch, cw, 3), jnp.float32),
           'label': array((train_batch, ch, cw), jnp.int32)}
  evaluation = {'image': array((eval_batch, ih, iw, 3), jnp.float32),
                'image_size': array((eval_batch, 2), jnp.int32),
                'label': array((eval_batch, lh, lw), jnp.int32),
                'label_size': array((eval_batch, 2), jnp.int32),
                'scaled_size': array((eval_batch, len(config.eval.scales), 2), jnp.int32),
                'valid': array((eval_batch,), jnp.bool_)}
  return train, evaluation


# ---------------------------------------------------------------------------------------------
# Compiling one step and what it costs.


@dataclasses.dataclass
class StepReport:
  """One compiled step, per chip. Memory in GiB; None where a step that does not fit has none."""
  compile_s: float
  fits: bool
  argument_gib: Optional[float] = None
  temp_gib: Optional[float] = None
  total_gib: Optional[float] = None  # arguments + outputs - aliased + temporaries + code
  code_gib: Optional[float] = None
  flops: Optional[float] = None  # loop-aware XLA count
  bytes: Optional[float] = None  # bytes accessed, loop-aware, on-chip memory included
  hbm_bytes: Optional[float] = None  # the part of `bytes` that moves through HBM
  model_flops: Optional[float] = None  # the work the step does for the model, x 3 for train
  roofline_step_s: Optional[float] = None  # max(compute_s, memory_s)
  roofline_mfu: Optional[float] = None
  compute_s: Optional[float] = None  # max(flops, model_flops) / peak FLOP/s
  memory_s: Optional[float] = None  # bytes / HBM bandwidth
  bound: Optional[str] = None  # 'compute' or 'memory'
  custom_calls: tuple = ()  # custom-call targets in the program (Pallas: 'tpu_custom_call')
  kernels: tuple = ()  # the names of the Pallas kernels in the program
  state_gib: Optional[float] = None  # train: parameters + optimizer state per chip
  error: str = ''  # the compiler's out-of-memory message


# A Pallas call's name, in the op_name of its custom call: '.../NAME/pallas_call', NAME as
# 'jit(flash_attention)' or with the block sizes appended ('flash_mha_bwd_dq_block_q_major=...').
_KERNEL_NAME = re.compile(
    r'custom_call_target="tpu_custom_call"[^\n]*?op_name="[^"]*?/(?:jit\()?([A-Za-z_]\w*?)'
    r'(?:_block\w*=[^/"]*)?\)?/pallas_call"')
_OOM = re.compile(r'RESOURCE_EXHAUSTED|[Oo]ut of memory')
_REQUIRED = re.compile(r'required for [^(]*\(([\d.]+)([KMGT])\)')


def compile_step(jitted, args, usable_hbm_gib: Optional[float]) -> StepReport:
  """Lowers and compiles `jitted` for `args` (abstract, with shardings) and measures it."""
  start = time.time()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if not _OOM.search(str(e)):
      raise
    message = str(e).splitlines()[0]
    required = _REQUIRED.search(message)
    total = None
    if required:
      total = float(required.group(1)) * 1024.0**('KMGT'.index(required.group(2)) - 2)
    return StepReport(compile_s=time.time() - start, fits=False, total_gib=total, error=message)
  seconds = time.time() - start
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
           + memory.generated_code_size_in_bytes) / GIB
  text = compiled.as_text()
  cost = hlo_cost.program_cost(text, jax.extend.backend.get_backend('cpu'))
  if cost['uncounted_loops']:
    print(f'  note: {cost["uncounted_loops"]} loop(s) without a readable trip count are counted '
          'once.', file=sys.stderr)
  return StepReport(
      compile_s=seconds,
      fits=usable_hbm_gib is None or total <= usable_hbm_gib,
      argument_gib=memory.argument_size_in_bytes / GIB, temp_gib=memory.temp_size_in_bytes / GIB,
      total_gib=total, code_gib=memory.generated_code_size_in_bytes / GIB,
      flops=cost['flops'], bytes=cost['bytes'], hbm_bytes=cost['hbm_bytes'],
      custom_calls=tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))),
      kernels=tuple(sorted(set(_KERNEL_NAME.findall(text)))))


def add_roofline(report: StepReport, model_flops: float, chip: Optional[Chip]) -> None:
  """Fills the roofline fields: max(FLOPs / peak, bytes / bandwidth), and the MFU it allows."""
  report.model_flops = model_flops
  if chip is None or report.flops is None:
    return
  report.compute_s = max(report.flops, model_flops) / chip.peak_flops
  report.memory_s = report.hbm_bytes / chip.hbm_bytes_per_s
  report.roofline_step_s = max(report.compute_s, report.memory_s)
  report.bound = 'compute' if report.compute_s >= report.memory_s else 'memory'
  report.roofline_mfu = model_flops / chip.peak_flops / report.roofline_step_s


def forward_flops(model_config: ml_collections.ConfigDict, image_hw, *, train: bool) -> float:
  """Hardware FLOPs of one forward pass (batch 1) from `summary`'s analytic count.

  summary counts a multiply-add as one FLOP (fvcore's convention): matmuls count twice here.
  The train forward stops at the mask logits: no semantic inference nor resizes to the input.
  """
  breakdown = summary.model_flops(model_config, tuple(image_hw))
  if train:
    breakdown = {k: v for k, v in breakdown.items()
                 if k not in ('head/mask_upsample', 'head/semantic_inference',
                              'head/resize_to_input')}
  return (2 * summary.total_flops(breakdown, ('matmul',))
          + summary.total_flops(breakdown, ('norm', 'upsample')))


def eval_forwards(config: ml_collections.ConfigDict) -> list:
  """[(input (h, w), count)] of the model calls per image of one eval step, every window active.

  The compiled step runs at most this many (windows outside an image's grid are skipped).
  """
  e, d = config.eval, config.dataset
  bucket = tuple(int(s) for s in d.eval_pad_size)
  crop = tuple(int(s) for s in e.crop_size)
  spec = inference.InferenceSpec.from_config(config)
  ratios, flips = spec.ratios, spec.flips
  out = []
  for ratio in ratios:
    size = bucket if ratio == 1.0 else spec.scaled_bucket(bucket, ratio)
    if e.mode == 'whole':
      out.append((size, len(flips)))
    else:
      grid = [inference.window_count(max(s, c), c, int(st))
              for s, c, st in zip(size, crop, e.stride)]
      out.append((crop, len(flips) * grid[0] * grid[1]))
  return out


def model_flops_per_chip(config: ml_collections.ConfigDict, chips: int, *, train_batch: int,
                         eval_batch: int) -> tuple:
  """(train, eval) model FLOPs per chip per step: 3 x forward for train, every eval view."""
  m = config.model
  train = 3 * forward_flops(m, config.dataset.crop_size, train=True) * train_batch / chips
  per_image = sum(n * forward_flops(m, hw, train=False) for hw, n in eval_forwards(config))
  return train, per_image * eval_batch / chips


# ---------------------------------------------------------------------------------------------
# The largest train batch that fits.


def search_max_batch(measure: Callable[[int], tuple], start: int, first: tuple,
                     usable_gib: float, unit: int = 1, limit: int = 1 << 16) -> tuple:
  """The largest per-shard train batch (a multiple of `unit`) that fits, and the compiles.

  measure(b) compiles at per-shard batch b and returns (total GiB per chip or None, fits);
  `first` is measure(start), already known. Memory is close to affine in the batch, so the
  measured totals (the compiler reports one for programs that do not fit too) predict the
  limit; every guess is compiled, within the bracket of the largest batch that fits and the
  smallest that does not, which shrinks by a quarter at least each time. Usually 3-4 compiles.
  Returns (0, log) when even `unit` does not fit; log: {b: (total, fits)}.
  """
  log = {start: first}
  for _ in range(24):
    lo = max((b for b, (_, ok) in log.items() if ok), default=None)
    hi = min((b for b, (_, ok) in log.items() if not ok), default=None)
    if lo is None:
      if hi <= unit:
        return 0, log
      guess = max(unit, hi // 2 // unit * unit)
    elif (hi is not None and hi - lo <= unit) or lo >= limit:
      return lo, log
    else:
      guess = _predict_max_batch(log, lo, hi, usable_gib)
      guess = guess // unit * unit
      if hi is None:
        guess = min(max(guess, lo + unit), limit)
      else:
        quarter = max(unit, (hi - lo) // 4 // unit * unit)
        guess = min(max(guess, lo + quarter), hi - quarter)
    log[guess] = measure(guess)
  raise RuntimeError(f'search_max_batch did not converge: {log}')


def _predict_max_batch(log: dict, lo: int, hi: Optional[int], usable_gib: float) -> int:
  """Where the affine fit through the two measured totals nearest the limit crosses it."""
  measured = {b: total for b, (total, _) in log.items() if total is not None}
  near = [b for b in (lo, hi) if b in measured]
  if len(near) < 2:
    near = sorted(measured)[-2:]
  if len(near) < 2:
    return 2 * lo
  (b0, t0), (b1, t1) = sorted((b, measured[b]) for b in near)
  slope = (t1 - t0) / (b1 - b0)
  if slope <= 0:
    return 2 * lo
  return int(b0 + (usable_gib - t0) / slope)


# ---------------------------------------------------------------------------------------------
# The analysis of a config on a target.


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _progress_done(report: StepReport) -> None:
  memory = f', {_gib(report.total_gib)} per chip' if report.total_gib is not None else ''
  _progress(f'  compiled in {report.compile_s:.1f} s{memory}'
            + ('' if report.fits else ': does not fit'))


def _with_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  return config


def _compile_train(config, devices, plan: preflight.Plan, usable: Optional[float]):
  programs = build_programs(config, devices)
  train_batch, _ = _abstract_batches(config, programs.mesh, config.batch_size, 1)
  _progress(f'compiling the train step: batch {config.batch_size} ({plan.train_batch_per_shard} '
            f'per data shard), {tuple(config.dataset.crop_size)} crops ...')
  with jax.set_mesh(programs.mesh), sharding.axis_rules():
    report = compile_step(programs.train_step, (programs.state, train_batch), usable)
  report.state_gib = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                         for x in jax.tree.leaves(programs.state)) / GIB
  _progress_done(report)
  return programs, report


def _compile_eval(config, programs: Programs, plan: preflight.Plan, usable: Optional[float]):
  _, eval_batch = _abstract_batches(config, programs.mesh, 1, plan.eval_batch_size)
  k = config.dataset.num_classes
  confusion = jax.ShapeDtypeStruct((k, k), jnp.int32, sharding=sharding.replicated(programs.mesh))
  variables = {'params': programs.eval_params}
  views = sum(n for _, n in eval_forwards(config))
  _progress(f'compiling the eval step: batch {plan.eval_batch_size} ({plan.eval_batch_per_shard} '
            f'per data shard), bucket {tuple(config.dataset.eval_pad_size)}, {views} model '
            f'call(s) per image ({config.eval.mode}) ...')
  with jax.set_mesh(programs.mesh), sharding.axis_rules():
    report = compile_step(programs.eval_step, (variables, eval_batch, confusion), usable)
  _progress_done(report)
  return report


def analyse(config: ml_collections.ConfigDict, target: Target, *, with_eval: bool = True,
            find_max_batch: bool = False) -> dict:
  """Checks, compiles and measures `config` on `target`: the --json object (see module doc).

  `with_eval=False` compiles the train step only ('eval' is then None).
  """
  plan = preflight.check(config, num_devices=target.chips, process_count=target.processes)
  devices = target_devices(target)
  chip = target.chip
  usable = chip.usable_hbm_gib if chip else _host_memory_gib() / target.chips
  programs, train = _compile_train(config, devices, plan, usable)
  train_flops, eval_flops = model_flops_per_chip(
      config, target.chips, train_batch=config.batch_size, eval_batch=plan.eval_batch_size)
  add_roofline(train, train_flops, chip)
  evaluation = None
  if with_eval:
    evaluation = _compile_eval(config, programs, plan, usable)
    add_roofline(evaluation, eval_flops, chip)
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


def _find_max_batch(config, devices, plan: preflight.Plan, first: StepReport,
                    usable: float) -> dict:
  shards = plan.batch_shards
  unit = int(config.optim.grad_accum_steps)

  def measure(per_shard: int) -> tuple:
    candidate = _with_batch(config, per_shard * shards)
    preflight.check(candidate, num_devices=len(devices), process_count=1)
    _, report = _compile_train(candidate, devices, dataclasses.replace(
        plan, train_batch_per_shard=per_shard), usable)
    return report.total_gib, report.fits

  best, log = search_max_batch(measure, plan.train_batch_per_shard,
                               (first.total_gib, first.fits), usable, unit)
  return {'per_shard': best, 'global': best * shards,
          'compiles': [[b, total, fits] for b, (total, fits) in sorted(log.items())]}


def _host_memory_gib() -> float:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB


# ---------------------------------------------------------------------------------------------
# Command line.


def _si(value: float, unit: str) -> str:
  """1.2e12, 'FLOP' -> '1.20 TFLOP'."""
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {prefix}{unit}'
  return f'{value:.0f} {unit}'


def _seconds(value: float) -> str:
  if value >= 1:
    return f'{value:.2f} s'
  return f'{value * 1e3:.3g} ms' if value >= 1e-3 else f'{value * 1e6:.3g} us'


def _gib(value: float) -> str:
  return f'{value:.2f} GiB' if value >= 0.1 else f'{value * 1024:.1f} MiB'


def _fmt_step(name: str, step: dict, chip: Optional[Chip]) -> list:
  lines = [f'{name} step (batch {step["batch_size"]}, {step["batch_per_shard"]} per data shard), '
           f'compiled in {step["compile_s"]:.1f} s:']
  if step['argument_gib'] is None:
    lines.append(f'  does not fit: {step["error"]}')
    return lines
  limit = f' of {chip.usable_hbm_gib:g} GiB usable ({chip.hbm_gib:g} GiB HBM)' if chip else ''
  lines.append(f'  memory per chip: arguments {_gib(step["argument_gib"])} + temporaries '
               f'{_gib(step["temp_gib"])}, total {_gib(step["total_gib"])}{limit}: '
               f'{"fits" if step["fits"] else "DOES NOT FIT"}')
  lines.append(f'  per chip per step: {_si(step["flops"], "FLOP")} (model '
               f'{_si(step["model_flops"], "FLOP")}), {_si(step["hbm_bytes"], "B")} of HBM '
               f'traffic ({_si(step["bytes"], "B")} with on-chip memory)')
  if step['roofline_step_s'] is not None:
    lines.append(f'  roofline: step >= {_seconds(step["roofline_step_s"])}, {step["bound"]} bound '
                 f'(compute {_seconds(step["compute_s"])}, HBM {_seconds(step["memory_s"])} at '
                 f'the peaks above): MFU <= {100 * step["roofline_mfu"]:.1f}%')
  if step.get('kernels'):
    lines.append(f'  Pallas kernels: {", ".join(step["kernels"])}')
  return lines


def format_report(result: dict, chip: Optional[Chip]) -> str:
  mesh = ', '.join(f'{k}={v}' for k, v in result['mesh'].items())
  lines = [f'{result["topology"]}: {result["chips"]} x {result["device_kind"]}, '
           f'{result["processes"]} host(s); mesh {mesh}; attention: {result["attention"]}']
  if chip:
    lines.append(f'peaks per chip: {chip.peak_flops / 1e12:g} TFLOP/s bf16, '
                 f'{chip.hbm_bytes_per_s / 1e12:g} TB/s HBM, {chip.hbm_gib:g} GiB HBM '
                 f'({chip.usable_hbm_gib:g} usable)')
  for name in ('train', 'eval'):
    if result[name] is not None:
      lines += _fmt_step(name, result[name], chip)
  if 'max_batch' in result:
    best = result['max_batch']
    lines.append(f'largest train batch that fits: {best["per_shard"]} per data shard '
                 f'(config.batch_size={best["global"]}), {len(best["compiles"])} compiles')
  return '\n'.join(lines)


def _mesh_text(mesh: dict) -> str:
  return ','.join(f'{axis}:{size}' for axis, size in mesh.items() if size > 1) or 'data:1'


def does_not_fit(result: dict, chip: Optional[Chip],
                 usable_fraction: float = 0.5) -> Optional[str]:
  """The one-line error for a step that does not fit, naming what to change; None if both do.

  When the train state alone takes more than `usable_fraction` of the memory, the advice is to
  shard it; otherwise to shrink the batch.
  """
  where = (f'the {chip.usable_hbm_gib:g} GiB a {chip.generation} chip offers' if chip else
           'this host\'s memory per device')
  train = result['train']
  if not train['fits'] and train['state_gib'] > usable_fraction * result['usable_hbm_gib']:
    return (f'the train step does not fit in {where}: the parameters and optimizer state alone '
            f'take {train["state_gib"]:.2f} GiB per chip on config.mesh='
            f'{_mesh_text(result["mesh"])!r}; shard them over the chips with an fsdp axis '
            "(e.g. config.mesh='fsdp:-1'), or use a larger slice.")
  for name, fixes in (
      ('train', 'lower config.batch_size (--find_max_batch finds the largest), or set '
                'config.model.remat=True or config.optim.grad_accum_steps, or use more chips'),
      ('eval', 'lower config.eval.batch_size or config.dataset.eval_pad_size, or use more '
               'chips')):
    step = result[name]
    if step is not None and not step['fits']:
      need = f'{step["total_gib"]:.2f} GiB' if step['total_gib'] else 'more'
      return (f'the {name} step needs {need} per chip, more than {where} (batch '
              f'{step["batch_size"]}, {step["batch_per_shard"]} per data shard): {fixes}.')
  if 'max_batch' in result and result['max_batch']['per_shard'] == 0:
    smallest = min(b for b, _, _ in result['max_batch']['compiles'])
    return (f'no train batch fits: even {smallest} example(s) per data shard need more than '
            f'{where}; set config.model.remat=True or use more chips.')
  return None


def main(argv) -> int:
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: every option is --name=value.')
  config = cli.config_value(flags.FLAGS['config'])
  if config is None or not flags.FLAGS['topology'].value:
    raise UserError('--config=configs/X.py and --topology=NAME (v4-32, v5litepod-16, ..., '
                    'cpu:N) are required.')
  target = parse_topology(flags.FLAGS['topology'].value)
  jax.config.update('jax_platforms', 'cpu')  # compiles for the target; runs nothing
  if target.chip is None:
    jax.config.update('jax_num_cpu_devices', target.chips)
  result = analyse(config, target, with_eval=not flags.FLAGS['train_only'].value,
                   find_max_batch=flags.FLAGS['find_max_batch'].value)
  if flags.FLAGS['json'].value:
    print(json.dumps(result))
  else:
    print(format_report(result, target.chip))
  problem = does_not_fit(result, target.chip)
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
