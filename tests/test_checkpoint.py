"""Checkpoint I/O: config.json, exported directories, training checkpoints, `load_params`.

A tiny SegViT (2 blocks of width 32, 3 classes) gives realistic parameter trees; its params are
random numpy arrays, so nothing is compiled.
"""

import json
import os
import stat

import flax.linen as nn
import jax
import numpy as np
import pytest

from segvit_jax import config as config_lib
from segvit_jax.checkpoint import integrity
from segvit_jax.checkpoint import orbax_handlers
from segvit_jax.checkpoint import parameters
from segvit_jax.checkpoint import training_checkpoints
from segvit_jax.evaluation import predictor
from segvit_jax.errors import UserError
from segvit_jax.models import segvit

P = jax.sharding.PartitionSpec


def tiny_config(**model):
  config = config_lib.get_base_config()
  config.model.update(dict(embed_dim=32, depth=2, num_heads=2, out_indices=(0, 1), use_stages=2,
                           decoder_dim=16, decoder_heads=2, decoder_layers=1, num_classes=3,
                           img_size=(32, 32), patch_size=16))
  config.model.update(model)
  config.dataset.num_classes = config.model.num_classes
  return config


def abstract_params(config):
  return nn.unbox(segvit.abstract_params(segvit.build_model(config.model)))


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                      abstract_params(config))


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), b)


def train_state(params, step):
  """What the trainer saves: step, params and AdamW-like moments (never read by load_params)."""
  zeros = jax.tree.map(np.zeros_like, params)
  return {'step': np.int32(step), 'params': params,
          'opt_state': ({'count': np.int32(step), 'mu': zeros, 'nu': zeros},)}


def write_workdir(workdir, config, steps=((3, 0), (6, 1))):
  """A training workdir: config.json and a checkpoint per (step, params seed)."""
  os.makedirs(workdir, exist_ok=True)
  config_lib.write_config(os.path.join(workdir, 'config.json'), config)
  ckpt = training_checkpoints.Checkpointer(training_checkpoints.checkpoint_dir(workdir),
                                           async_save=False)
  for step, seed in steps:
    ckpt.save(step, jax.tree.map(np.asarray, train_state(random_params(config, seed), step)))
  ckpt.close()


# ------------------------------------------------------------------------------------------------
# config.json


def test_config_round_trip_keeps_tuples_and_nested_dicts(tmp_path):
  config = tiny_config(img_size=(48, 64))
  config.convert = {'class_names': ('sky', 'road'), 'palette': ((1, 2, 3), (4, 5, 6)),
                    'source': '/x.pth', 'nested': {'deeper': {'pair': (7, 8)}}}
  config.init_checkpoint = ''
  config.optim.learning_rate = 3e-5
  path = str(tmp_path / 'config.json')
  config_lib.write_config(path, config)

  raw = json.loads(open(path).read())
  assert raw['model']['img_size'] == [48, 64] and not any('.' in k for k in raw)
  back = config_lib.read_config(path)
  assert back.to_dict() == config.to_dict()
  assert back.model.img_size == (48, 64) and back.convert.palette[1] == (4, 5, 6)
  assert back.convert.nested.deeper.pair == (7, 8)
  assert isinstance(back.optim.learning_rate, float) and back.model.depth == 2


def test_keys_a_config_json_lacks_take_the_defaults(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text(json.dumps({'model': {'embed_dim': 32}, 'extra': {'a': [1, 2]}}))
  config = config_lib.read_config(str(path))
  assert config.model.embed_dim == 32 and config.model.depth == 24  # the base's ViT-L depth
  assert config.loss.mask_weight == 20.0 and config.extra.a == (1, 2)


def test_load_config_reads_py_json_and_directories(tmp_path):
  config = tiny_config()
  config_lib.write_config(str(tmp_path / 'config.json'), config)
  (tmp_path / 'tiny.py').write_text(
      'from segvit_jax import config as config_lib\n\n'
      'def get_config():\n'
      '  config = config_lib.get_base_config()\n'
      '  config.model.embed_dim = 48\n'
      '  return config\n')
  assert config_lib.load_config(str(tmp_path / 'config.json')).to_dict() == config.to_dict()
  assert config_lib.load_config(str(tmp_path)).to_dict() == config.to_dict()
  assert config_lib.load_config(str(tmp_path / 'tiny.py')).model.embed_dim == 48
  with pytest.raises(UserError, match=r'--config=.*nope.py: no such file'):
    config_lib.load_config(str(tmp_path / 'nope.py'))
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(UserError, match='expected a configs/\\*.py file or a config.json'):
    config_lib.load_config(str(tmp_path / 'notes.txt'))


# The config.py that exported directories written before config I/O left segvit_jax.checkpoint
# hold (segvit_jax.checkpoint is a package now, without read_config).
_CONFIG_PY_OF_OLDER_VERSIONS = '''\
"""The config of the parameters in this directory: --config=THIS_DIR/config.py."""

import os

from segvit_jax import checkpoint


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  return checkpoint.read_config(os.path.join(here, 'config.json'))
'''


def test_config_py_beside_parameters_loads_old_and_new(tmp_path):
  config = tiny_config()
  config_lib.write_config(str(tmp_path / 'config.json'), config)
  path = tmp_path / 'config.py'
  path.write_text(_CONFIG_PY_OF_OLDER_VERSIONS)
  assert config_lib.load_config(str(path)).to_dict() == config.to_dict()
  config_lib.write_config_py(str(tmp_path))
  assert config_lib.load_config(str(path)).to_dict() == config.to_dict()
  # Run as a module (any tool importing it), today's text gives the same config.
  namespace = {'__file__': str(path)}
  exec(compile(path.read_text(), str(path), 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['get_config']().to_dict() == config.to_dict()
  # An edited config.py is the user's own: it runs.
  path.write_text(path.read_text().replace(
      "  return config_lib.read_config(os.path.join(here, 'config.json'))",
      "  c = config_lib.read_config(os.path.join(here, 'config.json'))\n"
      "  c.model.embed_dim = 48\n"
      "  return c"))
  assert config_lib.load_config(str(path)).model.embed_dim == 48


def test_flat_config_of_older_versions_says_what_to_do(tmp_path):
  config = tiny_config()
  workdir = str(tmp_path / 'old_run')
  write_workdir(workdir, config, steps=((3, 0),))
  # The flat layout older trainers wrote: dotted keys, tuples as their repr.
  flat = {'seed': 0, 'model.embed_dim': 32, 'model.img_size': '(32, 32)'}
  (tmp_path / 'old_run' / 'config.json').write_text(json.dumps(flat))
  with pytest.raises(UserError) as info:
    config_lib.read_config(os.path.join(workdir, 'config.json'))
  message = str(info.value)
  assert "flat layout of older segvit_jax versions (dotted keys such as 'model.embed_dim')" in (
      message)
  assert '--config=<the configs/*.py file the run was trained with' in message
  with pytest.raises(UserError, match='flat layout'):
    predictor.load_checkpoint(workdir)
  # With the config given, the params of such a workdir still load.
  _, variables, _ = predictor.load_checkpoint(workdir, config)
  assert_trees_equal(variables['params'], random_params(config, 0))


# ------------------------------------------------------------------------------------------------
# Both kinds through load_params.


def _modes(root):
  return {os.path.relpath(os.path.join(parent, name), root): stat.S_IMODE(
      os.stat(os.path.join(parent, name)).st_mode)
          for parent, dirs, files in os.walk(root) for name in dirs + files}


def test_exported_directory_is_readable_by_others_and_loads_as_host_arrays(tmp_path):
  config = tiny_config()
  params = random_params(config)
  directory = str(tmp_path / 'exported')
  old_umask = os.umask(0o077)  # what a private shell would give mkdtemp and open()
  try:
    parameters.export_params(directory, params, config, {'source': 'test'})
  finally:
    os.umask(old_umask)
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755
  modes = _modes(directory)
  assert {'config.json', 'config.py', 'meta.json', 'params'} <= set(modes)
  for name, mode in modes.items():
    assert mode == (0o755 if os.path.isdir(os.path.join(directory, name)) else 0o644), name
  assert not [n for n in os.listdir(tmp_path) if '.partial' in n]

  loaded, saved = parameters.load_params(directory, abstract_params(config))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  assert_trees_equal(loaded, params)
  assert saved.to_dict() == config.to_dict()
  assert parameters.saved_config(directory).to_dict() == config.to_dict()
  with pytest.raises(UserError, match='already exists and is not an empty directory'):
    parameters.export_params(directory, params, config)


def test_training_workdir_loads_the_latest_params_onto_a_mesh(tmp_path):
  config = tiny_config()
  workdir = str(tmp_path / 'run')
  write_workdir(workdir, config)
  want = random_params(config, 1)  # step 6's
  for path in (workdir, os.path.join(workdir, 'checkpoints')):
    loaded, saved = parameters.load_params(path, abstract_params(config))
    assert_trees_equal(loaded, want)
    assert saved.to_dict() == config.to_dict()

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  def target(path, a):
    spec = P(None, None, None, 'data') if 'patch_embed/kernel' in jax.tree_util.keystr(
        path, simple=True, separator='/') else P()
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
  abstract = jax.tree_util.tree_map_with_path(target, abstract_params(config))
  loaded, _ = parameters.load_params(workdir, abstract)
  for got, a in zip(jax.tree.leaves(loaded), jax.tree.leaves(abstract)):
    assert isinstance(got, jax.Array) and got.sharding == a.sharding
  assert_trees_equal(loaded, want)


def test_first_save_of_replicated_small_leaves_on_8_devices_compiles_nothing(tmp_path):
  """Small replicated leaves are written whole by one replica; only a leaf whose slices reach
  `orbax_handlers.MIN_REPLICA_SLICE_BYTES` is cut on device (a small program per slice)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, P())
  small = {f'leaf_{i}': jax.device_put(np.full((3, i + 1), i, np.float32), replicated)
           for i in range(40)}
  rows = 8 * orbax_handlers.MIN_REPLICA_SLICE_BYTES // 4 // 256  # 8 slices of the minimum
  big = {'big': jax.device_put(np.ones((rows, 256), np.float32), replicated)}
  compiles = []

  def count(event, *_, **__):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    for name, tree in (('small', small), ('big', big)):
      integrity.checksums(tree)  # compiled once per tree, not per slice: not counted here
      compiles.clear()
      ckpt = training_checkpoints.Checkpointer(str(tmp_path / name))
      ckpt.save(1, tree)
      ckpt.wait()
      assert (len(compiles) > 0) == (name == 'big'), (name, len(compiles))
      ckpt.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  restored = training_checkpoints.Checkpointer(str(tmp_path / 'small'), read_only=True).restore(
      1, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      small))
  assert_trees_equal(restored, small)


def test_a_different_model_config_is_named_by_its_keys(tmp_path):
  config, other = tiny_config(), tiny_config(embed_dim=64, num_classes=5)
  directory = str(tmp_path / 'exported')
  parameters.export_params(directory, random_params(config), config)
  workdir = str(tmp_path / 'run')
  write_workdir(workdir, config, steps=((3, 0),))
  with pytest.raises(UserError) as info:
    parameters.load_params(directory, abstract_params(other), config=other, flag='--checkpoint')
  assert str(info.value) == (
      f'--checkpoint={directory} holds the parameters of a different config: model.embed_dim 32 '
      '(checkpoint) vs 64 (config), model.num_classes 3 (checkpoint) vs 5 (config); use its own '
      'config.json or a configs/*.py file of the same model.')
  with pytest.raises(UserError, match=rf'^{workdir} was trained with a different config: '
                                      r'model.embed_dim 32 \(checkpoint\) vs 64 \(config\)'):
    parameters.load_params(workdir, abstract_params(other), config=other)

  # Without a saved config (or without the current one) the parameter paths say it.
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(UserError) as info:
    parameters.load_params(workdir, abstract_params(other), config=other)
  message = str(info.value)
  assert message.startswith(f'{workdir} does not fit the model of the config: ')
  # (The blocks are stacked: one leaf per parameter of a block, a leading axis of 2 blocks.)
  assert ('25 of another shape: backbone/blocks_0_1/attn/key/bias (2, 2, 16) (checkpoint) vs '
          '(2, 2, 32) (config), backbone/blocks_0_1/attn/key/kernel (2, 32, 2, 16) (checkpoint) '
          'vs (2, 64, 2, 32) (config)') in message
  assert message.endswith(', and 19 more; use the config it was trained with.')
  assert '\n' not in message and 'partial_restore' not in message
  deeper = tiny_config(depth=3, out_indices=(0, 2))
  with pytest.raises(UserError, match=r'does not fit the model of the config: \d+ missing: '
                                      r'backbone/blocks_0_2/.*; \d+ unexpected: '
                                      r'backbone/blocks_0_1/'):
    parameters.load_params(directory, abstract_params(deeper))


def test_resuming_with_another_config_names_the_keys(tmp_path):
  config, other = tiny_config(), tiny_config(depth=3, out_indices=(0, 2))
  workdir = str(tmp_path / 'run')
  write_workdir(workdir, config, steps=((3, 0),))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          train_state(random_params(other), 3))
  ckpt = training_checkpoints.Checkpointer(training_checkpoints.checkpoint_dir(workdir),
                                           async_save=False)
  try:
    with pytest.raises(UserError) as info:
      ckpt.restore(3, abstract, config=other)
  finally:
    ckpt.close()
  assert str(info.value) == (
      f'{workdir} was trained with a different config: model.depth 2 (checkpoint) vs 3 (config), '
      'model.out_indices (0, 1) (checkpoint) vs (0, 2) (config); use the config it was trained '
      'with, or another --workdir to start afresh.')


def test_paths_that_are_not_checkpoints(tmp_path):
  abstract = abstract_params(tiny_config())
  (tmp_path / 'ade.pth').write_bytes(b'PK')
  (tmp_path / 'notes.txt').write_text('x')
  (tmp_path / 'empty_run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'photos').mkdir()
  cases = {
      'missing': 'no such file or directory; expected a directory written by',
      'ade.pth': ('is an official PyTorch checkpoint: convert it first: python -m '
                  f'segvit_jax.convert {tmp_path}/ade.pth DIR'),
      'notes.txt': 'is a file, not a checkpoint directory',
      'empty_run': 'has no finished checkpoint yet (checkpoints/ holds no step)',
      'photos': ('is neither a directory written by segvit_jax.convert (params/ and config.json) '
                 'nor a training workdir (checkpoints/<step>/)'),
  }
  for name, says in cases.items():
    path = str(tmp_path / name)
    with pytest.raises(UserError) as info:
      parameters.load_params(path, abstract, flag='--checkpoint')
    assert str(info.value).startswith(f'--checkpoint={path}') and says in str(info.value), name
  with pytest.raises(UserError, match='no config.json: pass --config=configs/<name>.py'):
    directory = tmp_path / 'run'
    write_workdir(str(directory), tiny_config(), steps=((1, 0),))
    os.remove(directory / 'config.json')
    parameters.saved_config(str(directory))


def test_checkpoints_written_before_the_layers_were_scanned_still_load(tmp_path):
  """Exported directories and training workdirs with one 'block_{i}' / 'layer_{l}' per layer
  load (and resume) into the stacked layout."""
  config = tiny_config(decoder_layers=2)
  params = random_params(config)
  per_layer = segvit.unstack_params(params, config.model)
  assert 'block_1' in per_layer['backbone'] and 'blocks_0_1' not in per_layer['backbone']
  directory = str(tmp_path / 'exported')
  parameters.export_params(directory, per_layer, config)
  loaded, _ = parameters.load_params(directory, abstract_params(config), config=config)
  assert_trees_equal(loaded, params)

  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  config_lib.write_config(os.path.join(workdir, 'config.json'), config)
  state = train_state(params, 3)
  ckpt = training_checkpoints.Checkpointer(training_checkpoints.checkpoint_dir(workdir),
                                           async_save=False)
  ckpt.save(3, segvit.unstack_params(state, config.model))
  ckpt.close()
  loaded, _ = parameters.load_params(workdir, abstract_params(config), config=config)
  assert_trees_equal(loaded, params)
  ckpt = training_checkpoints.Checkpointer(training_checkpoints.checkpoint_dir(workdir))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  restored = ckpt.restore(3, abstract, config=config)
  ckpt.close()
  assert_trees_equal(restored, state)
