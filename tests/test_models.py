"""The SegViT model family at tiny sizes: shapes, gradients, inference semantics, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax import config_base
from segvit_jax import losses
from segvit_jax import resize
from segvit_jax.models import segvit

NUM_CLASSES = 5


def tiny_config(name='segvit', img_size=(64, 64)):
  c = config_base.get_base_config().model
  c.update(dict(embed_dim=32, depth=4, num_heads=2, out_indices=(1, 2, 3), decoder_dim=16,
                decoder_heads=2, num_classes=NUM_CLASSES, img_size=img_size, drop_path_rate=0.1))
  if name == 'segvit_shrunk':
    config_base.shrunk(c)
    c.shrink_index = 2
    c.out_indices = (1, 3)
  return c


def init(config, shape):
  model = segvit.build_model(config)
  variables = nn.unbox(model.init({'params': jax.random.key(0)}, jnp.zeros(shape), train=False))
  return model, variables


VARIANTS = ['segvit', 'segvit_shrunk']
# (input shape, stored img_size): square at the crop, non-square at the crop, and inputs that
# differ from the stored grid (position embedding resized at run time).
SHAPES = [((2, 64, 64, 3), (64, 64)), ((2, 128, 192, 3), (128, 192)),
          ((1, 96, 64, 3), (64, 64)), ((1, 64, 64, 3), (48, 80))]


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('shape,img_size', SHAPES)
def test_output_shapes(name, shape, img_size):
  config = tiny_config(name, img_size)
  model, variables = init(config, shape)
  images = jax.random.normal(jax.random.key(1), shape)
  b, h, w, _ = shape
  scores = model.apply(variables, images, train=False)
  assert scores.shape == (b, h, w, NUM_CLASSES)
  assert bool(jnp.all(scores >= 0)) and bool(jnp.all(jnp.isfinite(scores)))

  outputs = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
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
  model, variables = init(config, (1, 128, 192, 3))
  _, state = model.apply(variables, jnp.ones((1, 128, 192, 3)), train=False,
                         mutable=['intermediates'])
  taps = state['intermediates']['backbone']
  shapes = {k: v[0].shape for k, v in taps.items()}
  if name == 'segvit':
    assert shapes == {f'tap_{i}': (1, 8, 12, 32) for i in (1, 2, 3)}
  else:  # QD at block 2 halves the grid (even rows and columns kept).
    assert shapes == {'tap_1': (1, 8, 12, 32), 'tap_3': (1, 4, 6, 32)}


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('shape', [(2, 64, 64, 3), (2, 128, 192, 3)])
def test_jitted_gradient_reaches_every_parameter(name, shape):
  config = tiny_config(name, shape[1:3])
  model, variables = init(config, shape)
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
  if name == 'segvit':  # each stage's mask is its last layer's
    mask_layers = [f"['head']['decoder_{s}']['layer_2']" for s in (1, 2, 3)]
  else:  # every layer of the single-stage ATM head gives a mask
    mask_layers = [f"['head']['atm']['decoder_1']['layer_{i}']" for i in (0, 1, 2)]
  for layer in mask_layers:
    assert np.max(np.abs(flat[layer + "['cross_attn']['key']['bias']"])) > 1e-6, layer
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables['params'], new_params)
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
  model, variables = init(config, (2, 64, 64, 3))
  images = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
  scores = model.apply(variables, images, train=False)
  final = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(0)})
  masks = resize.resize_bilinear(final['mask_logits'], (64, 64))
  np.testing.assert_allclose(scores, segvit.semantic_inference(final['class_logits'], masks),
                             rtol=1e-5, atol=1e-6)
  # Not a constant map: the scores vary over the image.
  assert float(jnp.std(scores[..., 0])) > 1e-4


def test_bfloat16_compute_keeps_float32_params_and_is_close():
  config = tiny_config()
  model, variables = init(config, (1, 64, 64, 3))
  images = jax.random.normal(jax.random.key(5), (1, 64, 64, 3))
  ref = model.apply(variables, images, train=False)
  config.dtype = 'bfloat16'
  model16 = segvit.build_model(config)
  params16 = nn.unbox(model16.init({'params': jax.random.key(0)}, images, train=False))['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))
  out = model16.apply(variables, images, train=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05)
  assert float(jnp.max(jnp.abs(out - ref))) > 0  # really computed in bf16


@pytest.mark.parametrize('name', VARIANTS)
def test_remat_gives_the_same_gradients(name):
  config = tiny_config(name)
  model, variables = init(config, (1, 64, 64, 3))
  config_r = tiny_config(name)
  config_r.remat = 'full'
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
])
def test_bad_model_config_names_the_key(key, value, message):
  config = tiny_config()
  config[key] = value
  with pytest.raises(ValueError, match=rf'config\.model\.{key}: .*{message}'):
    segvit.build_model(config)
