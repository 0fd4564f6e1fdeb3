"""Official state-dict keys -> flax parameter paths: the rule engine and the ViT's rules.

A rule is (official key template, flax path template, transform); `{i}`, `{s}`, `{l}` in a
template stand for block, stage and layer numbers. A transform knows the flax shapes it must
produce, read off the model's abstract parameters, so head counts need no config: (d, H, hd)
kernels carry H. `torch_shape` gives the official shape those flax shapes imply, which is what
a source tensor is checked against.

`map_state_dict` is strict: every tensor maps to exactly one rule or is explicitly ignored,
every parameter is filled, and all missing, unexpected and mis-shaped keys come back in one
report before anything is converted. Layouts (mmseg -> flax): Linear (out, in) -> kernel
(in, out); `in_proj_weight` rows [q; k; v] -> three (d, H, hd) kernels; out_proj (d, H hd) ->
(H, hd, d); Conv (O, I, kh, kw) -> (kh, kw, I, O); LayerNorm weight -> scale.
"""

import dataclasses
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segvit_jax.convert import torch_files

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  suffixes: Tuple[str, ...]  # flax leaves written, relative to the rule's target path
  torch_shape: Callable[[Sequence[Shape]], Shape]
  apply: Callable[[np.ndarray, Sequence[Shape]], Sequence[np.ndarray]]


def _heads_in(w, shape):  # Linear (H*hd, d_in) -> (d_in, H, hd); bias (H*hd,) -> (H, hd)
  return w.T.reshape(shape) if w.ndim == 2 else w.reshape(shape)


COPY = Transform(('',), lambda s: s[0], lambda x, s: [x])
DENSE_KERNEL = Transform(('',), lambda s: s[0][::-1], lambda x, s: [x.T])
CONV = Transform(  # (O, I, kh, kw) -> (kh, kw, I, O)
    ('',), lambda s: (s[0][3], s[0][2], s[0][0], s[0][1]),
    lambda x, s: [x.transpose(2, 3, 1, 0)])
HEADS_KERNEL = Transform(  # q / k / v Linear weight -> (d_in, H, hd)
    ('',), lambda s: (s[0][1] * s[0][2], s[0][0]), lambda x, s: [_heads_in(x, s[0])])
HEADS_BIAS = Transform(('',), lambda s: (s[0][0] * s[0][1],), lambda x, s: [x.reshape(s[0])])
OUT_KERNEL = Transform(  # out_proj / proj weight (d_out, H*hd) -> (H, hd, d_out)
    ('',), lambda s: (s[0][2], s[0][0] * s[0][1]), lambda x, s: [x.T.reshape(s[0])])
IN_PROJ_KERNEL = Transform(  # stacked rows [q; k; v] (3 H hd, d_in)
    ('/query/kernel', '/key/kernel', '/value/kernel'), lambda s: (3 * s[0][1] * s[0][2], s[0][0]),
    lambda x, s: [_heads_in(part, shape) for part, shape in zip(np.split(x, 3, axis=0), s)])
IN_PROJ_BIAS = Transform(
    ('/query/bias', '/key/bias', '/value/bias'), lambda s: (3 * s[0][0] * s[0][1],),
    lambda x, s: [part.reshape(shape) for part, shape in zip(np.split(x, 3), s)])


def linear(src: str, dst: str):
  return [(src + '.weight', dst + '/kernel', DENSE_KERNEL), (src + '.bias', dst + '/bias', COPY)]


def norm(src: str, dst: str):
  return [(src + '.weight', dst + '/scale', COPY), (src + '.bias', dst + '/bias', COPY)]


def torch_mha(src: str, dst: str):
  """torch nn.MultiheadAttention (stacked in_proj) -> Attention(query, key, value, out)."""
  return [(src + '.in_proj_weight', dst, IN_PROJ_KERNEL),
          (src + '.in_proj_bias', dst, IN_PROJ_BIAS),
          (src + '.out_proj.weight', dst + '/out/kernel', OUT_KERNEL),
          (src + '.out_proj.bias', dst + '/out/bias', COPY)]


def vit_rules(prefix: str = 'backbone.'):
  """mmseg `VisionTransformer` (also `vit_shrink`: same keys) -> params['backbone']."""
  block, dst = prefix + 'layers.{i}', 'backbone/block_{i}'
  return ([(prefix + 'cls_token', 'backbone/cls_token', COPY),
           (prefix + 'pos_embed', 'backbone/pos_embed', COPY),
           (prefix + 'patch_embed.projection.weight', 'backbone/patch_embed/kernel', CONV),
           (prefix + 'patch_embed.projection.bias', 'backbone/patch_embed/bias', COPY)]
          + norm(block + '.ln1', dst + '/ln1') + norm(block + '.ln2', dst + '/ln2')
          + torch_mha(block + '.attn.attn', dst + '/attn')
          + linear(block + '.ffn.layers.0.0', dst + '/mlp/fc1')
          + linear(block + '.ffn.layers.1', dst + '/mlp/fc2'))


# ------------------------------------------------------------------------------------------------
# The engine.


def _template_regex(template: str) -> 're.Pattern':
  parts = re.split(r'\{(\w+)\}', template)
  return re.compile(''.join(re.escape(p) if k % 2 == 0 else rf'(?P<{p}>\d+)'
                            for k, p in enumerate(parts)))


@dataclasses.dataclass(frozen=True)
class _Rule:
  source: 're.Pattern'
  source_template: str
  target: 're.Pattern'  # matches every flax leaf the rule writes
  target_template: str
  transform: Transform


def _compile(rules) -> List[_Rule]:
  out = []
  for src, dst, transform in rules:
    leaves = '|'.join(re.escape(s) for s in transform.suffixes)
    target = _template_regex(dst).pattern + (f'(?:{leaves})' if leaves else '')
    out.append(_Rule(_template_regex(src), src, re.compile(target), dst, transform))
  return out


def flat_shapes(tree) -> Dict[str, Shape]:
  """'a/b/c' -> shape of every leaf of a nested dict of arrays or ShapeDtypeStructs."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(k.key) for k in path): tuple(x.shape) for path, x in flat}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def fmt(shape) -> str:
  return '(' + ', '.join(str(int(s)) for s in shape) + (',)' if len(shape) == 1 else ')')


@dataclasses.dataclass
class KeyReport:
  missing: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  mismatched: List[str] = dataclasses.field(default_factory=list)
  ignored: List[str] = dataclasses.field(default_factory=list)

  def error(self, limit: int = 5) -> Optional[str]:
    """One line: the first `limit` of each kind of problem, None when there is none."""
    sections = []
    for title, items in (('missing', self.missing), ('unexpected', self.unexpected),
                         ('wrong shape', self.mismatched)):
      if items:
        more = f', and {len(items) - limit} more' if len(items) > limit else ''
        sections.append(f'{len(items)} {title}: ' + ', '.join(items[:limit]) + more)
    return '; '.join(sections) or None


def _plan(state, table, ignore, shapes, expected, report):
  """(key, flax leaves, transform) for every tensor of `state` a rule maps; the rest reported."""
  plan = []
  for key, tensor in state.items():
    src_shape = tuple(tensor.shape)
    rule, match = next(((r, r.source.fullmatch(key)) for r in table if r.source.fullmatch(key)),
                       (None, None))
    if rule is None:
      why = next((why for p, why in ignore if p.fullmatch(key)), None)
      if why is not None:
        report.ignored.append(f'{key} {fmt(src_shape)}: {why}')
      else:
        report.unexpected.append(f'{key} {fmt(src_shape)}: no rule maps it to a parameter')
      continue
    base = rule.target_template.format(**match.groupdict())
    targets = [base + s for s in rule.transform.suffixes]
    absent = [t for t in targets if t not in shapes]
    if absent:
      report.unexpected.append(f'{key} {fmt(src_shape)}: the model has no {absent[0]}')
      continue
    want = tuple(rule.transform.torch_shape([shapes[t] for t in targets]))
    for t in targets:
      expected[t] = None  # accounted for, whether or not its shape fits
    if src_shape != want:
      report.mismatched.append(
          f'{key}: checkpoint {fmt(src_shape)}, model expects {fmt(want)} (-> {base})')
      continue
    plan.append((key, targets, rule.transform))
  return plan


def _report_missing(table, shapes, expected, report) -> None:
  missing = {}  # official key -> (its expected shape, flax leaves it would fill)
  for path, shape in expected.items():
    if shape is None:
      continue
    rule, m = next(((r, r.target.fullmatch(path)) for r in table if r.target.fullmatch(path)),
                   (None, None))
    if rule is None:
      missing[path] = (shape, [path])
      continue
    groups = m.groupdict()
    base = rule.target_template.format(**groups)
    leaves = [base + s for s in rule.transform.suffixes]
    missing.setdefault(rule.source_template.format(**groups), (
        tuple(rule.transform.torch_shape([shapes[t] for t in leaves])), leaves))
  for key, (shape, leaves) in missing.items():
    report.missing.append(f'{key} {fmt(shape)} -> {" ".join(leaves)}')


def map_state_dict(state: Mapping[str, Any], abstract_params, rules: Sequence[tuple],
                   ignored: Sequence[Tuple[str, str]] = (),
                   to_array: Callable[[Any], np.ndarray] = torch_files.to_numpy,
                   ) -> Tuple[Dict[str, Any], KeyReport]:
  """Maps every tensor of `state` onto the flax tree `abstract_params` (anything with .shape).

  `ignored`: (regular expression, reason) of tensors without a counterpart, on purpose.
  Returns (params as a nested dict of float32 jax arrays, report). Nothing is converted when
  the report has an error (the caller raises it); otherwise tensors are read one at a time.
  """
  shapes = flat_shapes(abstract_params)
  expected: Dict[str, Optional[Shape]] = dict(shapes)
  table = _compile(rules)
  report = KeyReport()
  plan = _plan(state, table, [(re.compile(p), why) for p, why in ignored], shapes, expected,
               report)
  _report_missing(table, shapes, expected, report)
  if report.error():
    return {}, report
  flat = {}
  for key, targets, transform in plan:
    arrays = transform.apply(to_array(state[key]), [shapes[t] for t in targets])
    for t, a in zip(targets, arrays):
      # Straight to a device array: the host copy is dropped at once, so converting never holds
      # more than one tensor twice (and Orbax saves device arrays without another copy).
      flat[t] = jnp.asarray(np.ascontiguousarray(a, dtype=np.float32))
  return unflatten(flat), report
