"""Stacking per-layer parameter trees along a new leading axis and back.

Scanned modules (`nn.scan` with `variable_axes={'params': 0}`) hold one tree whose leaves have
a leading layer axis; the official checkpoints hold one tree per layer. Leaves may be numpy or
jax arrays or `jax.ShapeDtypeStruct`s; a NamedSharding gains (or loses) a replicated leading
dimension, so abstract restore targets keep their layouts.
"""

from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any


def _with_spec(sharding, spec_of):
  if isinstance(sharding, NamedSharding):
    return sharding.update(spec=spec_of(tuple(sharding.spec)))
  return sharding


def _stack_leaves(leaves: Sequence[Any]):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = _with_spec(first.sharding, lambda spec: P(None, *spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _unstack_leaf(stacked, n: int) -> List[Any]:
  if stacked.shape[0] != n:
    raise ValueError(f'A stacked leaf of shape {stacked.shape} does not hold {n} layers.')
  if isinstance(stacked, jax.ShapeDtypeStruct):
    sharding = _with_spec(stacked.sharding, lambda spec: P(*spec[1:]))
    return [jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=sharding)] * n
  return [stacked[i] for i in range(n)]


def stack(trees: Sequence[PyTree]) -> PyTree:
  """n trees of one structure -> one tree whose leaves are (n, ...)."""
  return jax.tree.map(lambda *leaves: _stack_leaves(leaves), *trees)


def unstack(tree: PyTree, n: int) -> List[PyTree]:
  """The inverse of `stack`: a tree of (n, ...) leaves -> n trees."""
  per_leaf = jax.tree.map(lambda x: _unstack_leaf(x, n), tree)
  is_list = lambda x: isinstance(x, list)
  return [jax.tree.map(lambda leaves, i=i: leaves[i], per_leaf, is_leaf=is_list)
          for i in range(n)]
