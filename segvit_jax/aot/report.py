"""What `segvit-compile` prints: the report of an analysis, and the error for what does not fit.

Both read the --json object of `analysis.analyse` (a dict: 'train' / 'eval' steps, 'mesh',
'max_batch', ...) and the target's `Chip` (None for CPU devices).
"""

from typing import Optional

from segvit_jax.aot.targets import Chip


def _format_si(value: float, unit: str) -> str:
  """1.2e12, 'FLOP' -> '1.20 TFLOP'."""
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {prefix}{unit}'
  return f'{value:.0f} {unit}'


def _format_seconds(value: float) -> str:
  if value >= 1:
    return f'{value:.2f} s'
  return f'{value * 1e3:.3g} ms' if value >= 1e-3 else f'{value * 1e6:.3g} us'


def format_gib(value: float) -> str:
  """1.5 -> '1.50 GiB'; below 0.1 GiB in MiB (0.05 -> '51.2 MiB')."""
  return f'{value:.2f} GiB' if value >= 0.1 else f'{value * 1024:.1f} MiB'


def _format_step(name: str, step: dict, chip: Optional[Chip]) -> list:
  lines = [f'{name} step (batch {step["batch_size"]}, {step["batch_per_shard"]} per data shard), '
           f'compiled in {step["compile_s"]:.1f} s:']
  if step['argument_gib'] is None:
    lines.append(f'  does not fit: {step["error"]}')
    return lines
  limit = f' of {chip.usable_hbm_gib:g} GiB usable ({chip.hbm_gib:g} GiB HBM)' if chip else ''
  lines.append(f'  memory per chip: arguments {format_gib(step["argument_gib"])} + temporaries '
               f'{format_gib(step["temp_gib"])}, total {format_gib(step["total_gib"])}{limit}: '
               f'{"fits" if step["fits"] else "DOES NOT FIT"}')
  flops, model = _format_si(step['flops'], 'FLOP'), _format_si(step['model_flops'], 'FLOP')
  lines.append(f'  per chip per step: {flops} (model {model}), '
               f'{_format_si(step["hbm_bytes"], "B")} of HBM traffic '
               f'({_format_si(step["bytes"], "B")} with on-chip memory)')
  if step['roofline_step_s'] is not None:
    step_s, compute_s, memory_s = (_format_seconds(step[k])
                                   for k in ('roofline_step_s', 'compute_s', 'memory_s'))
    lines.append(f'  roofline: step >= {step_s}, {step["bound"]} bound (compute {compute_s}, '
                 f'HBM {memory_s} at the peaks above): MFU <= {100 * step["roofline_mfu"]:.1f}%')
  if step.get('kernels'):
    lines.append(f'  Pallas kernels: {", ".join(step["kernels"])}')
  return lines


def format_report(result: dict, chip: Optional[Chip]) -> str:
  """The human-readable report: the target and mesh, then per step memory, FLOPs, roofline."""
  mesh = ', '.join(f'{k}={v}' for k, v in result['mesh'].items())
  lines = [f'{result["topology"]}: {result["chips"]} x {result["device_kind"]}, '
           f'{result["processes"]} host(s); mesh {mesh}; attention: {result["attention"]}']
  if chip:
    lines.append(f'peaks per chip: {chip.peak_flops / 1e12:g} TFLOP/s bf16, '
                 f'{chip.hbm_bytes_per_s / 1e12:g} TB/s HBM, {chip.hbm_gib:g} GiB HBM '
                 f'({chip.usable_hbm_gib:g} usable)')
  for name in ('train', 'eval'):
    if result[name] is not None:
      lines += _format_step(name, result[name], chip)
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
