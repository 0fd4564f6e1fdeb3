"""Mesh strings and logical-axis rules (no devices needed beyond the default one)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from segvit_jax import sharding
from segvit_jax.errors import UserError


@pytest.mark.parametrize('spec,n,want', [
    ('data:-1', 8, {'data': 8, 'fsdp': 1, 'model': 1}),
    ('data:4,model:2', 8, {'data': 4, 'fsdp': 1, 'model': 2}),
    ('data:2,fsdp:4', 8, {'data': 2, 'fsdp': 4, 'model': 1}),
    ('model:2,data:-1', 8, {'data': 4, 'fsdp': 1, 'model': 2}),
    (' data : 1 ', 1, {'data': 1, 'fsdp': 1, 'model': 1}),
    ('fsdp:-1', 4, {'data': 1, 'fsdp': 4, 'model': 1}),
])
def test_parse_mesh_spec(spec, n, want):
  assert sharding.parse_mesh_spec(spec, n) == want


@pytest.mark.parametrize('spec,n,message', [
    ('data:3', 8, 'uses 3 devices but 8'),
    ('data:-1,model:3', 8, 'does not divide'),
    ('data:-1,model:-1', 8, 'only one axis'),
    ('batch:8', 8, 'axis:size'),
    ('data', 8, 'axis:size'),
    ('data:x', 8, 'not an integer'),
    ('data:4,data:2', 8, 'twice'),
    ('data:0', 8, 'positive'),
])
def test_parse_mesh_spec_errors(spec, n, message):
  with pytest.raises(UserError, match=message) as error:
    sharding.parse_mesh_spec(spec, n)
  assert str(error.value).startswith(f'config.mesh={spec!r}: ') and '\n' not in str(error.value)


def test_make_mesh_has_all_axes_auto():
  mesh = sharding.make_mesh('data:-1', jax.devices()[:1])
  assert mesh.axis_names == ('data', 'fsdp', 'model')
  assert tuple(mesh.shape.values()) == (1, 1, 1)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


class _FakeMesh:
  shape = {'data': 2, 'fsdp': 4, 'model': 2}


@pytest.mark.parametrize('spec,shape,want', [
    (P('fsdp', 'model'), (32, 64), P('fsdp', 'model')),
    (P('fsdp', 'model'), (6, 64), P(None, 'model')),  # 4 does not divide 6
    (P(None, 'model', None), (32, 3, 8), P()),  # 3 classes over model:2
    (P(('data', 'fsdp')), (16, 3), P(('data', 'fsdp'))),
    (P(('data', 'fsdp')), (2, 3), P('data')),  # keeps the axes that still divide
    (P(), (5,), P()),
])
def test_fit_spec(spec, shape, want):
  assert sharding._fit_spec(spec, shape, _FakeMesh()) == want


def test_logical_rules_map_model_names():
  rules = dict(sharding.LOGICAL_AXIS_RULES)
  assert rules['batch'] == ('data', 'fsdp')
  assert rules['embed'] == 'fsdp'
  assert rules['mlp'] == rules['heads'] == 'model'
  assert rules['kv'] is rules['classes'] is rules['queries'] is None
  assert nn.logical_to_mesh_axes(('embed', 'heads', 'kv'), sharding.LOGICAL_AXIS_RULES) == P(
      'fsdp', 'model', None)


def test_logical_to_shardings_on_boxed_tree():
  class Tiny(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ('embed', 'mlp')), name='fc')(x)
      return nn.LayerNorm(name='ln1')(x)

  mesh = sharding.make_mesh('data:-1', jax.devices()[:1])
  boxed = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.zeros((1, 4)))['params']
  shardings = sharding.logical_to_shardings(boxed, mesh)
  assert shardings['fc']['kernel'].spec == P('fsdp', 'model')
  assert shardings['fc']['bias'].spec == P()  # no logical names: replicated
  assert shardings['ln1']['scale'].spec == P()


@pytest.mark.parametrize('mesh_spec,spec,shape,want', [
    ('data:-1', P(), (8, 16), P('data')),  # the largest dimension but the minor one
    ('data:-1', P(None, 'fsdp'), (3, 16), P(None, 'data')),  # fsdp:1 splits nothing
    ('data:4,model:2', P(None, 'fsdp', 'model'), (3, 8, 16), P(None, 'data', 'model')),
    ('data:2,fsdp:4', P('fsdp', None), (8, 6), P('fsdp', 'data')),
    ('data:2,fsdp:2,model:2', P(None, 'model'), (4, 6), P(('data', 'fsdp'), 'model')),
    ('data:4,model:2', P(None, 'model'), (3, 6), P(None, 'model')),  # 4 divides neither
])
def test_update_sharding_splits_the_state_over_the_batch_axes(mesh_spec, spec, shape, want):
  mesh = sharding.make_mesh(mesh_spec, jax.devices()[:8])
  got = sharding.update_sharding(jax.sharding.NamedSharding(mesh, spec), shape)
  assert got.spec == want


def test_batch_shards_are_data_times_fsdp():
  assert sharding.batch_shards({'data': 2, 'fsdp': 4, 'model': 2}) == 8
  assert sharding.batch_shards(sharding.parse_mesh_spec('model:2,data:-1', 8)) == 4


@pytest.mark.parametrize('batch,shards,processes,want', [
    (20, 8, 1, 24), (8, 16, 4, 16), (16, 16, 4, 16), (1, 1, 1, 1), (5, 4, 2, 8), (7, 2, 3, 12),
])
def test_padded_batch_size(batch, shards, processes, want):
  assert sharding.padded_batch_size(batch, shards, processes) == want
