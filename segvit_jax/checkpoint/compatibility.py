"""Whether a saved parameter tree fits the model of a config, and one line saying why not.

A tree that does not fit is named by the config keys in which the saved config.json differs from
the current config (`config_differences`) when both are known, else by its parameter paths
(missing, unexpected, of another shape). Trees saved before the blocks and decoder layers were
scanned (one 'block_{i}' / 'layer_{l}' per layer, `is_per_layer`) are read in that layout and
stacked by the callers.
"""

from typing import Any, Mapping, Optional, Sequence

import ml_collections
import orbax.checkpoint as ocp

from segvit_jax.errors import UserError
from segvit_jax.models import segvit

PyTree = Any

_SHOWN = 6  # items listed in a message


def listed(items: Sequence[str]) -> str:
  """'a, b, c' of the first `_SHOWN` items, then ', and N more'."""
  more = f', and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
  return ', '.join(items[:_SHOWN]) + more


def is_per_layer(saved_params: Mapping[str, Any],
                 config: Optional[ml_collections.ConfigDict]) -> bool:
  """Whether saved params name one 'block_{i}' / 'layer_{l}' per layer (checkpoints and exported
  directories written before the blocks and decoder layers were scanned): they are restored
  into the per-layer layout and stacked."""
  return config is not None and segvit.has_unstacked_layout(saved_params, config.model)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape of every leaf, keyed as Orbax stores the tree."""
  return {'/'.join(k): tuple(getattr(v, 'shape', ())) for k, v in
          ocp.tree.to_flat_dict(tree).items()}


def _flat_section(config: ml_collections.ConfigDict, section: str) -> dict[str, Any]:
  out = {}

  def visit(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f'{prefix}.{k}', v)
    else:
      out[prefix] = tuple(value) if isinstance(value, list) else value

  visit(section, config.to_dict().get(section, {}))
  return out


_ABSENT = object()


def _fmt(value: Any) -> str:
  return 'absent' if value is _ABSENT else str(value)


def config_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                       sections: Sequence[str] = ('model',)) -> list[str]:
  """'model.embed_dim 768 (checkpoint) vs 1024 (config)' for each key of `sections` that differs."""
  out = []
  for section in sections:
    a, b = _flat_section(saved, section), _flat_section(current, section)
    for key in list(b) + [k for k in a if k not in b]:
      x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
      if x != y:
        out.append(f'{key} {_fmt(x)} (checkpoint) vs {_fmt(y)} (config)')
  return out


def _tree_differences(saved: PyTree, wanted: PyTree) -> list[str]:
  """The parameter paths missing from / unexpected in `saved`, and those of another shape."""
  have, want = _shapes(saved), _shapes(wanted)
  missing = [k for k in want if k not in have]
  unexpected = [k for k in have if k not in want]
  shapes = [f'{k} {have[k]} (checkpoint) vs {want[k]} (config)' for k in want
            if k in have and have[k] != want[k]]
  parts = []
  for title, items in (('missing', missing), ('unexpected', unexpected),
                        ('of another shape', shapes)):
    if items:
      parts.append(f'{len(items)} {title}: {listed(items)}')
  return parts


_FIXES = {
    'resume': 'use the config it was trained with, or another --workdir to start afresh',
    'training': 'use the config it was trained with',
    'exported': 'use its own config.json or a configs/*.py file of the same model',
}


def check_fits(saved: PyTree, wanted: PyTree, *, label: str, kind: str,
               saved_config: Optional[ml_collections.ConfigDict],
               config: Optional[ml_collections.ConfigDict], sections: Sequence[str]) -> None:
  """Raises UserError (one line) unless `saved` holds exactly the leaves and shapes of `wanted`.

  `kind`: 'resume' (a Checkpointer's restore), 'training' (params of a training workdir) or
  'exported'; `label` names the path in the message; `sections` of the configs are compared.
  """
  tree = _tree_differences(saved, wanted)
  if not tree:
    return
  keys = (config_differences(saved_config, config, sections)
          if saved_config is not None and config is not None else [])
  if keys:
    what = 'was trained with' if kind != 'exported' else 'holds the parameters of'
    raise UserError(f'{label} {what} a different config: {listed(keys)}; {_FIXES[kind]}.')
  raise UserError(f'{label} does not fit the model of the config: {"; ".join(tree)}; '
                  f'{_FIXES[kind]}.')
