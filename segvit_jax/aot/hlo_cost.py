"""What a compiled XLA program costs per device: FLOPs, bytes accessed and HBM bytes per run.

`program_cost(hlo_text, cost_backend)` reads the text of an optimised (per-device, SPMD) HLO
module, `compiled.as_text()`, and prices each instruction with XLA's own HloCostAnalysis (of
`cost_backend`, the CPU client: the TPU compile-only client has none) on a module of that one
instruction, then adds them up with every while-loop body counted as often as the loop runs
(XLA's figure for a whole module counts a loop body once), the costlier branch of each
conditional, and Pallas kernels' FLOPs from their cost estimates.

HBM bytes leave out what the compiler placed in on-chip memory: a TPU's memory-space assignment
gives such buffers a memory space in their layout (`{1,0:T(8,128)S(3)}`; HBM is space 0). An
instruction reading an operand there, or writing an output there, does not move those bytes
through HBM; the asynchronous copies that fill and drain on-chip buffers do, on their HBM side.
"""

import dataclasses
import re
from typing import Optional

from jax._src.lib import _jax  # XLA's cost analysis of an HLO module: no public API
import jaxlib._hlo as hlo_lib  # HLO text -> module: no public API

_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.\-]+) \(.*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*)$')
_WHILE = re.compile(r'\swhile\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)')
_CALLEES = re.compile(
    r'(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)'
    r'|branch_computations=\{([^}]*)\}')
_REFERENCE = re.compile(r'%([\w.\-]+)')
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{"flops":"?(\d+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COUNTER_CONSTANT = re.compile(r'\s[su]32\[\]\S* constant\((-?\d+)\)')
_TUPLE_INDEX = re.compile(r'get-tuple-element\(%[\w.\-]+\), index=(\d+)')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?')
_ON_CHIP = re.compile(r'S\([1-9]\d*\)\}$')
_ITEM_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
               'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
               'c128': 16}
# Instructions that move or compute nothing themselves (or whose work their start counts).
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
         'partition-id', 'replica-id', 'opt-barrier', 'copy-done', 'slice-done', 'async-done',
         'all-gather-done', 'all-reduce-done', 'collective-permute-done', 'send-done',
         'recv-done', 'add-dependency'}
# Asynchronous starts with output ((source), result, context): the result is read and written.
_ASYNC_COPIES = {'copy-start', 'slice-start'}


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  bytes: float = 0.0  # every operand read and output written, wherever it lives
  hbm_bytes: float = 0.0  # the part of `bytes` in HBM (memory space 0)

  def __add__(self, other: 'Cost') -> 'Cost':
    return Cost(self.flops + other.flops, self.bytes + other.bytes,
                self.hbm_bytes + other.hbm_bytes)

  def __mul__(self, times: int) -> 'Cost':
    return Cost(self.flops * times, self.bytes * times, self.hbm_bytes * times)


def _elements(shape: str) -> list:
  """The top-level elements of a tuple shape '(a, b, (c, d))', or [shape] for an array."""
  shape = re.sub(r'/\*index=\d+\*/', '', shape).strip()
  if not shape.startswith('('):
    return [shape]
  out, depth, current = [], 0, ''
  for ch in shape[1:-1]:
    depth += ch in '([{'
    depth -= ch in ')]}'
    if ch == ',' and depth == 0:
      out.append(current.strip())
      current = ''
    else:
      current += ch
  return out + ([current.strip()] if current.strip() else [])


def _bytes(shape: str) -> float:
  """Bytes of every array in `shape` (nested tuples included)."""
  total = 0.0
  for dtype, dims, _ in _ARRAY.findall(shape):
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    total += count * _ITEM_BYTES.get(dtype, 4)
  return total


def _on_chip(shape: str) -> bool:
  return not shape.startswith('(') and bool(_ON_CHIP.search(shape))


def _operands(text: str) -> tuple:
  """(operands, rest) of `text`, what follows 'op(': the operand list split at top-level
  commas, and the attributes after its closing parenthesis."""
  out, depth, current = [], 0, ''
  for end, ch in enumerate(text):
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      if depth == 0:
        return [o for o in out + [current.strip()] if o], text[end + 1:]
      depth -= 1
    elif ch == ',' and depth == 0:
      out.append(current.strip())
      current = ''
      continue
    current += ch
  return [o for o in out + [current.strip()] if o], ''


class _Hlo:
  """The computations of an HLO module's text, by name, and the shape of every instruction."""

  def __init__(self, text: str):
    text = re.sub(r' stack_frame_id=\d+', '', text)  # the parser warns about their ids
    self.bodies: dict = {}
    self.order: list = []
    self.entry = None
    self.shapes: dict = {}  # (computation, instruction) -> shape text
    name, body = None, []
    for line in text.splitlines()[1:]:
      match = _COMPUTATION.match(line) if name is None else None
      if match:
        name, body = match.group(2), [line.removeprefix('ENTRY ')]
        self.entry = name if match.group(1) else self.entry
      elif name is not None:
        body.append(line)
        instruction = _INSTRUCTION.match(line)
        if instruction:
          self.shapes[(name, instruction.group(1))] = instruction.group(2)
        if line == '}':
          self.bodies[name] = body
          self.order.append(name)
          name = None

  def reachable(self, roots: list) -> set:
    needed, todo = set(), list(roots)
    while todo:
      name = todo.pop()
      if name not in needed:
        needed.add(name)
        todo.extend(r for line in self.bodies[name][1:] for r in _REFERENCE.findall(line)
                    if r in self.bodies)
    return needed

  def callees(self, line: str) -> list:
    out = []
    for single, several in _CALLEES.findall(line):
      out.extend([single] if single else _REFERENCE.findall(several))
    return [c for c in out if c in self.bodies]

  def _definition(self, computation: str, name: str) -> str:
    prefix = f'%{name} = '
    return next((ln for ln in self.bodies[computation] if ln.lstrip().startswith(prefix)), '')

  def trip_count(self, computation: str, line: str) -> Optional[int]:
    """Iterations of the while loop on `line` of `computation`: XLA's known trip count, or the
    `i < N` of a counted loop (jax's scan / fori_loop / map, s32; the SPMD partitioner's
    windowed einsums, u32) from its constant initial value."""
    known = _TRIP_COUNT.search(line)
    if known:
      return int(known.group(1))
    operand, condition, _ = _WHILE.search(line).groups()
    cond = self.bodies[condition]
    limits = _COUNTER_CONSTANT.findall('\n'.join(cond))
    counters = set(_TUPLE_INDEX.findall('\n'.join(cond)))
    root = next((ln for ln in cond if 'ROOT' in ln), '')
    if (len(limits) != 1 or len(counters) != 1 or ' compare(' not in root
        or 'direction=LT' not in root):
      return None
    start = 0
    elements = re.search(r'\stuple\((.*?)\)', self._definition(computation, operand))
    counter = int(counters.pop())
    if elements and counter < len(_REFERENCE.findall(elements.group(1))):
      initial = _REFERENCE.findall(elements.group(1))[counter]
      value = _COUNTER_CONSTANT.search(self._definition(computation, initial))
      start = int(value.group(1)) if value else 0
    return max(int(limits[0]) - start, 0)


class _Pricer:
  """Cost of single instructions: XLA's analysis of a module holding only that instruction."""

  def __init__(self, hlo: _Hlo, cost_backend):
    self.hlo = hlo
    self.backend = cost_backend
    self.unpriced = 0  # instructions XLA could not parse alone: priced by their shapes

  def __call__(self, computation: str, line: str) -> Cost:
    _, shape, op, rest = _INSTRUCTION.match(line).groups()
    references, attributes = _operands(re.sub(r'/\*index=\d+\*/', '', rest))
    operands = [self.hlo.shapes.get((computation, o[1:]), '') if o.startswith('%') else ''
                for o in references]
    flops = sum(float(v) for v in _KERNEL_FLOPS.findall(line))
    if op in _ASYNC_COPIES:
      source, result = _elements(shape)[:2]
      source = _elements(source)[0]
      size = _bytes(result)
      return Cost(flops, 2 * size, size * ((not _on_chip(source)) + (not _on_chip(result))))
    analysis = self._analyse(line, shape, op, operands, attributes)
    if analysis is None:  # by shapes: every operand read once, every output written once
      self.unpriced += 1
      ins = [(_bytes(s), _on_chip(s)) for s in operands]
      outs = [(_bytes(s), _on_chip(s)) for s in _elements(shape)]
      return Cost(flops, sum(b for b, _ in ins + outs),
                  sum(b for b, chip in ins + outs if not chip))
    value = lambda key: max(float(analysis.get(key, 0.0)), 0.0)  # -1: unknown (AllocateBuffer)
    hbm = sum(value(f'bytes accessed{i}{{}}') for i, s in enumerate(operands) if not _on_chip(s))
    outs = _elements(shape)
    if len(outs) == 1 and not shape.startswith('('):
      hbm += 0.0 if _on_chip(shape) else value('bytes accessedout{}')
    else:
      hbm += sum(value(f'bytes accessedout{{{j}}}') for j, s in enumerate(outs) if not _on_chip(s))
    return Cost(value('flops') + flops, value('bytes accessed'), hbm)

  def _analyse(self, line, shape, op, operands, attributes) -> Optional[dict]:
    if any(not s for s in operands):
      return None
    tail = re.sub(r',? ?metadata=\{[^}]*\}', '', attributes)
    params = [f'  p{i} = {s} parameter({i})' for i, s in enumerate(operands)]
    names = ', '.join(f'p{i}' for i in range(len(operands)))
    lines = ['HloModule one']
    called = self.hlo.reachable(self.hlo.callees(line))  # fused computations, reducers
    for name in self.hlo.order:
      if name in called:
        lines.extend(self.hlo.bodies[name])
    lines += ['ENTRY one {', *params, f'  ROOT r = {shape} {op}({names}){tail}', '}']
    try:
      module = hlo_lib.hlo_module_from_text('\n'.join(lines))
      return _jax.hlo_module_cost_analysis(self.backend, module)
    except Exception:  # pylint: disable=broad-except
      return None


def program_cost(hlo_text: str, cost_backend) -> dict:
  """{'flops', 'bytes', 'hbm_bytes', 'uncounted_loops', 'unpriced'} of one run of a compiled
  module, per device for SPMD. Loops whose trip count cannot be read count once
  ('uncounted_loops'); 'unpriced' instructions are priced by their shapes."""
  hlo = _Hlo(hlo_text)
  price = _Pricer(hlo, cost_backend)
  memo: dict = {}
  uncounted = []

  def computation_cost(name: str) -> Cost:
    if name in memo:
      return memo[name]
    total = Cost()
    for line in hlo.bodies[name][1:]:
      instruction = _INSTRUCTION.match(line)
      if not instruction or instruction.group(3) in _FREE:
        continue
      op = instruction.group(3)
      loop = _WHILE.search(line) if op == 'while' else None
      if loop:
        trips = hlo.trip_count(name, line)
        if trips is None:
          uncounted.append(loop.group(3))
        total += computation_cost(loop.group(3)) * (1 if trips is None else trips)
      elif op == 'conditional':  # the costlier branch, as XLA's own analysis takes it
        branches = [computation_cost(c) for c in hlo.callees(line)]
        total += max(branches, key=lambda c: (c.hbm_bytes, c.flops), default=Cost())
      elif op == 'call':
        total += sum((computation_cost(c) for c in hlo.callees(line)), Cost())
      else:
        total += price(name, line)
    memo[name] = total
    return total

  cost = computation_cost(hlo.entry)
  return {'flops': cost.flops, 'bytes': cost.bytes, 'hbm_bytes': cost.hbm_bytes,
          'uncounted_loops': len(uncounted), 'unpriced': price.unpriced}
