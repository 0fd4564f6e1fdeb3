"""Compiling one step for a target and measuring it: memory, FLOPs, bytes, the roofline.

`compile_step` lowers and compiles a jitted step for abstract arguments (shapes with shardings)
and reads what the compiled program needs per chip: XLA's memory analysis, and FLOPs and bytes
from `hlo_cost` (every loop counted as often as it runs). A step that does not fit comes back as
a report with fits=False and the compiler's message. `add_roofline` adds the lower bound on the
step time, max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth), at a chip's published peaks.
"""

import dataclasses
import re
import sys
import time
from typing import Optional

import jax
import jax.extend

from segvit_jax.aot import hlo_cost
from segvit_jax.aot.targets import Chip

GIB = 2.0**30


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
