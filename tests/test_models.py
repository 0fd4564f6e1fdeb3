"""The SegViT model family at tiny sizes: shapes, gradients, inference semantics, options."""

import contextlib
import io

import flax.linen as nn
import jax
import jax.ad_checkpoint
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segvit_jax import config as config_lib
from segvit_jax import losses
from segvit_jax.models import resize
from segvit_jax import sharding
from segvit_jax.errors import UserError
from segvit_jax.models import layers
from segvit_jax.models import segvit
from segvit_jax.models import vit

NUM_CLASSES = 5


def tiny_config(name='segvit', img_size=(64, 64)):
  c = config_lib.get_base_config().model
  c.update(dict(embed_dim=32, depth=4, num_heads=2, out_indices=(1, 2, 3), decoder_dim=16,
                decoder_heads=2, num_classes=NUM_CLASSES, img_size=img_size, drop_path_rate=0.1))
  if name == 'segvit_shrunk':
    config_lib.shrunk(c)
    c.shrink_index = 2
    c.out_indices = (1, 3)
  return c


_VARIABLES = {}


def init(config):
  """The model of `config` and its variables, initialised as the trainer does (at the stored
  img_size, whatever the inputs a test feeds), once per config in a test process."""
  model = segvit.build_model(config)
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _VARIABLES:
    # Jitted: eager Flax init dispatches every op on its own, several times slower on CPU.
    _VARIABLES[key] = jax.jit(lambda k: nn.unbox(segvit.init_variables(model, k)))(
        jax.random.key(0))
  return model, _VARIABLES[key]


VARIANTS = ['segvit', 'segvit_shrunk']
# (input shape, stored img_size): square at the crop, and inputs that differ from the stored grid
# (position embedding resized at run time), non-square either way.
SHAPES = [((2, 64, 64, 3), (64, 64)), ((1, 96, 64, 3), (64, 64)), ((1, 64, 64, 3), (48, 80))]


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('shape,img_size', SHAPES)
def test_output_shapes(name, shape, img_size):
  config = tiny_config(name, img_size)
  model, variables = init(config)
  images = jax.random.normal(jax.random.key(1), shape)
  b, h, w, _ = shape
  # One program for both modes: on 2 cores each compile costs seconds.
  scores, outputs = jax.jit(lambda v, x: (
      model.apply(v, x, train=False),
      model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)})))(variables, images)
  assert scores.shape == (b, h, w, NUM_CLASSES)
  assert bool(jnp.all(scores >= 0)) and bool(jnp.all(jnp.isfinite(scores)))

  if name == 'segvit':
    grid = (h // 16, w // 16)
  else:  # QU queries live on the stored grid, whatever the input size (as officially).
    grid = (img_size[0] // 16, img_size[1] // 16)
  assert outputs['class_logits'].shape == (b, NUM_CLASSES, NUM_CLASSES + 1)
  assert outputs['mask_logits'].shape == (b, *grid, NUM_CLASSES)
  assert len(outputs['aux']) == 2
  for aux in outputs['aux']:
    assert aux['class_logits'].shape == (b, NUM_CLASSES, NUM_CLASSES + 1)
    assert aux['mask_logits'].shape == (b, *grid, NUM_CLASSES)


@pytest.mark.parametrize('name', VARIANTS)
def test_backbone_taps_and_grids(name):
  config = tiny_config(name, (128, 192))
  model, variables = init(config)
  _, state = model.apply(variables, jnp.ones((1, 128, 192, 3)), train=False,
                         mutable=['intermediates'])
  taps = state['intermediates']['backbone']
  shapes = {k: v[0].shape for k, v in taps.items()}
  if name == 'segvit':
    assert shapes == {f'tap_{i}': (1, 8, 12, 32) for i in (1, 2, 3)}
  else:  # QD at block 2 halves the grid (even rows and columns kept).
    assert shapes == {'tap_1': (1, 8, 12, 32), 'tap_3': (1, 4, 6, 32)}


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('shape', [(2, 64, 96, 3)])
def test_jitted_gradient_reaches_every_parameter(name, shape):
  config = tiny_config(name, shape[1:3])
  model, variables = init(config)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=shape), jnp.float32)
  labels = rng.integers(0, NUM_CLASSES, size=shape[:3]).astype(np.int32)
  labels[:, :8] = 255

  @jax.jit
  def grad_step(params):
    def loss_fn(p):
      outputs = model.apply({'params': p}, images, train=True, rngs={'dropout': jax.random.key(3)})
      return losses.atm_loss(outputs, jnp.asarray(labels), num_classes=NUM_CLASSES)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, grads, jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)

  loss, grads, new_params = grad_step(variables['params'])
  assert np.isfinite(float(loss))
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(grads)}
  assert np.all(flat["['backbone']['cls_token']"] == 0)
  pos = flat["['backbone']['pos_embed']"]
  assert np.all(pos[:, 0] == 0) and np.all(np.any(pos[:, 1:] != 0, axis=-1))
  dead = [k for k, g in flat.items()
          if 'cls_token' not in k and 'pos_embed' not in k and not np.any(g != 0)]
  assert not dead, f'parameters without gradient: {dead}'
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  # Key biases of softmax attention have a mathematically zero gradient (a constant shift of every
  # logit of a query), so only float noise reaches them, as in PyTorch; the ATM cross-attention's
  # key bias does learn, through the mask logits.
  # (Each decoder's layers are stacked: leading axis = layer.)
  if name == 'segvit':  # each stage's mask is its last layer's
    mask_layers = [(f"['head']['decoder_{s}']['layers']", 2) for s in (1, 2, 3)]
  else:  # every layer of the single-stage ATM head gives a mask
    mask_layers = [("['head']['atm']['decoder_1']['layers']", i) for i in (0, 1, 2)]
  for layer, i in mask_layers:
    assert np.max(np.abs(flat[layer + "['cross_attn']['key']['bias']"][i])) > 1e-6, (layer, i)
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables['params'],
                                 new_params)
  assert moved['head']['queries'] and moved['backbone']['patch_embed']['kernel']


def test_semantic_inference_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
  masks = rng.normal(size=(2, 3, 6, 4)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  sig = 1 / (1 + np.exp(-masks))
  expected = np.zeros((2, 3, 6, 4))
  for b in range(2):
    for c in range(4):
      for q in range(4):
        expected[b, :, :, c] += probs[b, q, c] * sig[b, :, :, q]
  np.testing.assert_allclose(segvit.semantic_inference(logits, masks), expected, rtol=1e-5)


@pytest.mark.parametrize('name', VARIANTS)
def test_eval_scores_are_semantic_inference_of_final_prediction(name):
  config = tiny_config(name)
  config.decoder_dropout = 0.0  # train mode without dropout computes what eval mode computes
  config.drop_path_rate = 0.0
  model, variables = init(config)
  images = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
  scores = model.apply(variables, images, train=False)
  final = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(0)})
  masks = resize.resize_bilinear(final['mask_logits'], (64, 64))
  np.testing.assert_allclose(scores, segvit.semantic_inference(final['class_logits'], masks),
                             rtol=1e-5, atol=1e-6)
  # Not a constant map: the scores vary over the image.
  assert float(jnp.std(scores[..., 0])) > 1e-5


def test_bfloat16_compute_keeps_float32_params_and_is_close():
  config = tiny_config()
  model, variables = init(config)
  images = jax.random.normal(jax.random.key(5), (1, 64, 64, 3))
  ref = model.apply(variables, images, train=False)
  config.dtype = 'bfloat16'
  model16 = segvit.build_model(config)
  params16 = nn.unbox(segvit.abstract_params(model16))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))
  out = model16.apply(variables, images, train=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05)
  assert float(jnp.max(jnp.abs(out - ref))) > 0  # really computed in bf16


# Each policy on one variant (compiling both variants for both costs minutes on 2 cores); the
# second case also unrolls the scans two blocks per iteration.
@pytest.mark.parametrize('name,policy,unroll', [('segvit', 'full', 1),
                                                ('segvit_shrunk', 'dots', 2)])
def test_remat_gives_the_same_gradients(name, policy, unroll):
  config = tiny_config(name)
  model, variables = init(config)
  config_r = tiny_config(name)
  config_r.remat = policy
  config_r.scan_unroll = unroll
  model_r = segvit.build_model(config_r)
  images = jax.random.normal(jax.random.key(6), (1, 64, 64, 3))

  def grads(m):
    def loss_fn(p):
      out = m.apply({'params': p}, images, train=True, rngs={'dropout': jax.random.key(7)})
      return jnp.sum(out['mask_logits'] ** 2) + jnp.sum(out['class_logits'])
    return jax.jit(jax.grad(loss_fn))(variables['params'])

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         grads(model), grads(model_r))


@pytest.mark.parametrize('key,value,message', [
    ('name', 'segformer', 'not one of'),
    ('num_heads', 3, 'divisible'),
    ('out_indices', (3, 1), 'increasing'),
    ('use_stages', 4, 'between 1 and len'),
    ('img_size', (60, 64), 'multiple of patch_size'),
    ('dtype', 'float16', 'float32 or bfloat16'),
    ('scan_unroll', 0, 'positive integer'),
])
def test_bad_model_config_names_the_key(key, value, message):
  config = tiny_config()
  config[key] = value
  with pytest.raises(UserError, match=rf'config\.model\.{key}: .*{message}'):
    segvit.build_model(config)


def test_remat_values():
  config = tiny_config()
  config.remat = 'some'
  with pytest.raises(UserError, match=r"config\.model\.remat='some' is not one of 'none', "
                                      r"'full', 'dots'\."):
    segvit.build_model(config)
  # Configs saved while remat was a bool (converted directories) still build.
  legacy = ml_collections.ConfigDict(tiny_config().to_dict())
  for value, policy in ((False, 'none'), (True, 'full')):
    with legacy.ignore_type():
      legacy.remat = value
    assert segvit.remat_policy(legacy) == policy
    segvit.build_model(legacy)


# ---------------------------------------------------------------------------------------------
# Scanned segments and the per-block layout.


def test_segments_are_cut_around_the_qd_block_only():
  names = lambda *a: [s.name for s in vit.block_segments(*a)]
  assert names(24) == ['blocks_0_23']
  assert names(24, 8) == ['blocks_0_7', 'block_8', 'blocks_9_23']
  assert names(4, 0) == ['block_0', 'blocks_1_3']
  assert names(4, 3) == ['blocks_0_2', 'block_3']


@pytest.mark.parametrize('name', VARIANTS)
def test_stack_and_unstack_params(name):
  config = tiny_config(name)
  _, variables = init(config)
  params = variables['params']
  backbone = params['backbone']
  per_layer = segvit.unstack_params(params, config)
  per_block = per_layer['backbone']
  assert sorted(k for k in per_block if k.startswith('block')) == [f'block_{i}' for i in range(4)]
  assert not segvit.has_unstacked_layout(params, config)
  assert segvit.has_unstacked_layout(per_layer, config)
  assert segvit.has_unstacked_layout({'head': per_layer['head']}, config)
  first = vit.segments_of(config)[0]
  np.testing.assert_array_equal(per_block['block_1']['mlp']['fc1']['kernel'],
                                backbone[first.name]['mlp']['fc1']['kernel'][1])
  atm_decoder = lambda head: head['decoder_1'] if name == 'segvit' else head['atm']['decoder_1']
  per_layer_decoder = atm_decoder(per_layer['head'])
  assert sorted(k for k in per_layer_decoder if k.startswith('layer')) == [
      'layer_0', 'layer_1', 'layer_2']
  np.testing.assert_array_equal(per_layer_decoder['layer_2']['linear1']['kernel'],
                                atm_decoder(params['head'])['layers']['linear1']['kernel'][2])
  restacked = segvit.stack_params(per_layer, config)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), restacked, params))
  # Abstract trees: shapes lose / gain the leading axis, shardings their leading entry.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'model'))
  spec = lambda x: P(None, 'fsdp', *([None] * (x.ndim - 3)), 'model') if x.ndim >= 3 else P()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec(x))), backbone)
  un = vit.unstack_blocks(abstract, config)
  assert un['block_1']['mlp']['fc1']['kernel'].shape == (32, 128)
  assert un['block_1']['mlp']['fc1']['kernel'].sharding.spec == P('fsdp', 'model')
  again = vit.stack_blocks(un, config)[first.name]['mlp']['fc1']['kernel']
  n = first.stop - first.start  # segvit: 4 blocks, shrunk: the 2 before the QD block
  assert again.shape == (n, 32, 128) and again.sharding.spec == P(None, 'fsdp', 'model')


def test_stacked_axis_is_replicated_and_the_rest_keeps_its_sharding():
  config = tiny_config()
  boxed = segvit.abstract_params(segvit.build_model(config))
  names = nn.get_partition_spec(boxed)['backbone']['blocks_0_3']['mlp']['fc1']['kernel']
  assert tuple(names) == ('layers', 'embed', 'mlp')
  assert nn.logical_to_mesh_axes(tuple(names), sharding.LOGICAL_AXIS_RULES) == P(
      None, 'fsdp', 'model')


def test_per_block_checkpoint_restores_into_the_stacked_layout(tmp_path):
  """What restoring a checkpoint written before the blocks were scanned takes: detect the layout
  from the checkpoint's metadata, restore into the per-block target, stack."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = tiny_config('segvit_shrunk')
  _, variables = init(config)
  state = {'params': variables['params'],
           'opt_state': ({'mu': jax.tree.map(lambda x: x + 1, variables['params'])},)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'old', segvit.unstack_params(state, config))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(tmp_path / 'old').item_metadata
    assert segvit.has_unstacked_layout(saved['params'], config)
    restored = checkpointer.restore(tmp_path / 'old', segvit.unstack_params(abstract, config))
  restored = segvit.stack_params(restored, config)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) == np.asarray(b))),
                                   restored, state))


def _saved_shapes(fn, *args) -> list:
  """The shapes of what the backward pass of `fn` keeps from its forward pass (weights too)."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  return [line.split()[0] for line in printed.getvalue().splitlines()]


def test_mlp_backward_keeps_only_fc1_output():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 8))
  mlp = vit.Mlp(32)
  params = mlp.init(jax.random.PRNGKey(1), x)
  saved = _saved_shapes(lambda x: mlp.apply(params, x).sum(), x)
  # The two kernels and fc1's pre-GELU output; not GELU's output or its erf / exp terms.
  assert sorted(saved) == sorted(['f32[8,32]', 'f32[32,8]', 'f32[1,12,32]']), saved


def test_dropout_attention_recomputes_its_maps_with_the_same_mask():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 8))
  attention = layers.Attention(2, dropout_rate=0.5)
  params = attention.init(jax.random.PRNGKey(1), x, x, True)

  def loss(x):
    out, _ = attention.apply(params, x, x, False, rngs={'dropout': jax.random.PRNGKey(3)})
    return (out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)).sum()

  saved = _saved_shapes(loss, x)
  assert 'f32[1,2,12,12]' not in saved, saved  # no (B, H, Nq, Nk) map is kept
  assert saved.count('f32[1,12,2,4]') == 3, saved  # q, k, v
  # The recomputed maps use the forward's dropout mask: the gradient is the function's slope.
  direction = jax.random.normal(jax.random.PRNGKey(5), x.shape)
  h = 1e-2
  slope = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
  assert float(jnp.vdot(jax.grad(loss)(x), direction)) == pytest.approx(float(slope), rel=1e-3)
  # ... and the mask does drop weights: another key gives another output.
  other, _ = attention.apply(params, x, x, False, rngs={'dropout': jax.random.PRNGKey(4)})
  assert not np.allclose(other, attention.apply(params, x, x, False,
                                                rngs={'dropout': jax.random.PRNGKey(3)})[0])
