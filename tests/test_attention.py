"""The attention implementations against softmax(q k^T) v and their choice per platform.

(The Pallas kernel inside the compiled TPU programs: tests/test_compile.py.)"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from segvit_jax.errors import UserError
from segvit_jax.models import attention
from segvit_jax.models import layers
from segvit_jax.models import tpu_dropout_attention


def reference(q, k, v):
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


def _inputs(nq, nk, dtype=jnp.float32, seed=0, heads=3, head_dim=8):
  rng = np.random.default_rng(seed)
  # Large logits: a peaked softmax tests the max shift.
  q = rng.normal(0, 1.5, (2, nq, heads, head_dim))
  k = rng.normal(0, 1.5, (2, nk, heads, head_dim))
  v = rng.normal(size=(2, nk, heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def check_against_reference(fn, q, k, v, atol, grad_atol, reference_fn=None):
  """fn's output and its q / k / v gradients (of a random projection) vs the float32 formula
  (`reference_fn`, default `reference`)."""
  reference_fn = reference_fn or reference
  as32 = lambda *a: tuple(x.astype(jnp.float32) for x in a)
  got = fn(q, k, v)
  assert got.dtype == v.dtype and got.shape == q.shape
  want = reference_fn(*as32(q, k, v))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=atol)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * probe), argnums=(0, 1, 2))
  expected = jax.grad(lambda *a: jnp.sum(reference_fn(*a) * probe), argnums=(0, 1, 2))
  for name, g, w in zip('qkv', grads(q, k, v), expected(*as32(q, k, v))):
    scale = float(jnp.max(jnp.abs(w)))
    assert scale > 1e-3, name
    assert g.dtype == q.dtype, name
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=grad_atol * scale,
                               err_msg=name)


# ---------------------------------------------------------------------------------------------
# CPU: per head.


@pytest.mark.parametrize('nq,nk', [(24, 24), (6, 24), (24, 7)])  # self, QD (fewer queries), cross
def test_per_head_forward_and_gradients_match(nq, nk):
  check_against_reference(attention.attend_per_head, *_inputs(nq, nk), atol=1e-5, grad_atol=2e-5)


def test_per_head_in_bfloat16_keeps_float32_statistics():
  q, k, v = _inputs(24, 24, jnp.bfloat16)
  got = attention.attend_per_head(q, k, v)
  assert got.dtype == jnp.bfloat16
  want = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_per_head_implementation_loops_only_over_large_maps(monkeypatch):
  calls = []
  monkeypatch.setattr(attention, 'attend_per_head', lambda *a: calls.append(1) or reference(*a))
  monkeypatch.setattr(attention, 'PER_HEAD_MIN_SIZE', 24 * 24)
  jax.jit(attention.attend, static_argnums=3)(*_inputs(24, 24), 'per_head')
  assert calls == [1]
  jax.jit(attention.attend, static_argnums=3)(*_inputs(6, 24), 'per_head')  # 144 < 576: batched
  jax.jit(attention.attend, static_argnums=3)(*_inputs(24, 24, seed=1), 'xla')
  assert calls == [1]


# ---------------------------------------------------------------------------------------------
# TPU: the Pallas kernel, in interpret mode on this CPU.


@pytest.mark.parametrize('nq,nk,dtype,atol,grad_atol', [
    (130, 130, jnp.float32, 1e-5, 1e-5),  # self-attention, both sides padded to 256
    (40, 130, jnp.bfloat16, 4e-2, 4e-2),  # QD-like: fewer queries than keys, bfloat16
])
def test_pallas_tpu_kernel_matches_the_formula(nq, nk, dtype, atol, grad_atol):
  q, k, v = _inputs(nq, nk, dtype, heads=2, head_dim=16)
  q = q / 4  # logits of a realistic size for bfloat16 (the scale is folded into q)
  with pltpu.force_tpu_interpret_mode():
    check_against_reference(attention.attend_pallas_tpu, q, k, v, atol, grad_atol)


def test_pallas_tpu_padding_gives_padded_keys_no_weight():
  """Keys past nk are zero after padding; unmasked, they would take weight exp(0) = 1 each."""
  q, k, v = _inputs(3, 5, heads=1, head_dim=8)
  with pltpu.force_tpu_interpret_mode():
    got = attention.flash_tpu(q, k, v)
  np.testing.assert_allclose(got, reference(q, k, v), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# TPU: our kernel for attention with dropout, in interpret mode on this CPU.

RATE = 0.1


def numpy_keep_mask(seed: int, nq: int, nk: int, width: int, rate: float) -> np.ndarray:
  """murmur3's 32-bit finaliser of (row * width + col) * 0x9E3779B1 + seed, in uint32."""
  rows, cols = np.meshgrid(np.arange(nq, dtype=np.uint64), np.arange(nk, dtype=np.uint64),
                           indexing='ij')
  m32 = np.uint64(0xFFFFFFFF)
  x = ((rows * np.uint64(width) + cols) * np.uint64(0x9E3779B1) + np.uint64(seed % 2**32)) & m32
  x ^= x >> np.uint64(16)
  x = (x * np.uint64(0x85EBCA6B)) & m32
  x ^= x >> np.uint64(13)
  x = (x * np.uint64(0xC2B2AE35)) & m32
  x ^= x >> np.uint64(16)
  return (x >> np.uint64(8)) >= round(rate * 2**24)


def dropout_reference(q, k, v, seeds):
  """softmax(q k^T), weights dropped where numpy_keep_mask says and scaled, times v."""
  nq, nk = q.shape[1], k.shape[1]
  keep = np.stack([np.stack([numpy_keep_mask(int(s), nq, nk, attention.tpu_padded_length(nk), RATE)
                             for s in row]) for row in np.asarray(seeds)])  # (B, H, Nq, Nk)
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32), axis=-1)
  weights = jnp.where(keep, weights / (1 - RATE), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


def test_dropout_keep_mask_is_the_hash_and_keeps_one_minus_rate():
  rows, cols = jnp.arange(300)[:, None], jnp.arange(200)[None, :]
  for seed in (0, 12345, -2**31, 2**31 - 1):
    got = tpu_dropout_attention.keep_mask(jnp.int32(seed), rows, cols, 256, RATE)
    np.testing.assert_array_equal(got, numpy_keep_mask(seed, 300, 200, 256, RATE))
  masks = [np.asarray(tpu_dropout_attention.keep_mask(jnp.int32(s), rows, cols, 256, RATE))
           for s in (1, 2)]
  assert abs(masks[0].mean() - 0.9) < 0.005 and abs(masks[1].mean() - 0.9) < 0.005
  # Two seeds' masks are independent: they agree where both keep or both drop, 0.9^2 + 0.1^2.
  assert abs((masks[0] == masks[1]).mean() - 0.82) < 0.01


def test_dropout_layer_drops_by_the_hash_of_each_examples_positions(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (8, 6, 5, 16)) + 10.0  # no zeros of its own
  seeds = np.array([[7], [-3], [2**31 - 1], [0], [11], [12], [13], [14]], np.int32)
  monkeypatch.setattr(attention, 'dropout_seeds', lambda key, b, h: jnp.asarray(seeds[:b]))
  # Jitted, as the sharded runs below: eager jax >= 0.12 divides exactly where a jitted program
  # multiplies by the reciprocal (1 ulp apart).
  drop = lambda x: layers.Dropout(RATE).apply({}, x, False, rngs={'dropout': jax.random.key(1)})
  y = np.asarray(jax.jit(drop)(x))
  for b in range(8):  # the positions (6 x 5 flattened) are the rows, the channels the columns
    keep = numpy_keep_mask(int(seeds[b, 0]), 30, 16, 16, RATE).reshape(6, 5, 16)
    np.testing.assert_allclose(y[b], np.where(keep, np.asarray(x[b]) / (1 - RATE), 0),
                               rtol=1e-6)
  np.testing.assert_array_equal(layers.Dropout(RATE).apply({}, x, True), x)
  # Split over 8 devices along the batch or along the channels: the same elements dropped.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('d',))
  for spec in (P('d'), P(None, None, None, 'd')):
    f = jax.jit(drop, in_shardings=NamedSharding(mesh, spec))
    np.testing.assert_array_equal(np.asarray(f(x)), y)


@pytest.mark.parametrize('nq,nk,dtype,atol,grad_atol', [
    (130, 130, jnp.float32, 1e-5, 1e-5),  # self-attention: 2 query blocks, keys padded to 256
    (40, 200, jnp.bfloat16, 4e-2, 4e-2),  # fewer queries than keys (the ATM cross-attention)
])
def test_pallas_tpu_dropout_kernel_matches_the_formula(nq, nk, dtype, atol, grad_atol):
  q, k, v = _inputs(nq, nk, dtype, heads=2, head_dim=16)
  q = q / 4
  seeds = attention.dropout_seeds(jax.random.key(3), 2, 2)
  kernel = lambda q, k, v: attention.dropout_flash_tpu(q, k, v, seeds, RATE)
  with pltpu.force_tpu_interpret_mode():
    check_against_reference(kernel, q, k, v, atol, grad_atol,
                            reference_fn=lambda q, k, v: dropout_reference(q, k, v, seeds))


def test_attention_layer_in_training_on_tpu_takes_the_dropout_kernel(monkeypatch):
  calls = []
  def fake(q, k, v, seeds, rate):
    calls.append((q.shape, seeds.shape, seeds.dtype, rate))
    return v
  monkeypatch.setattr(attention, 'attend_dropout_pallas_tpu', fake)
  layer = layers.Attention(4, dropout_rate=RATE, attention='pallas_tpu')
  x, memory = jnp.ones((2, 5, 8)), jnp.ones((2, 7, 8))
  with pltpu.force_tpu_interpret_mode():  # without dropout: the flash kernel
    variables = layer.init(jax.random.key(0), x, memory, True)
    layer.apply(variables, x, memory, False, rngs={'dropout': jax.random.key(1)})
    assert calls == [((2, 5, 4, 2), (2, 4), jnp.int32, RATE)]
    layer.apply(variables, x, memory, True)
  assert len(calls) == 1


def test_tpu_blocks():
  assert [attention.tpu_padded_length(n) for n in (150, 900, 1024, 1600, 2500)] == [
      256, 1024, 1024, 1664, 2560]
  assert [attention.tpu_block(n) for n in (256, 1024, 1664, 2560)] == [256, 512, 128, 512]


# ---------------------------------------------------------------------------------------------
# GPU: cuDNN's call, its formula checked through XLA.


@pytest.mark.parametrize('dtype,atol', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_cudnn_call_computes_the_formula(dtype, atol):
  q, k, v = _inputs(24, 7, dtype)
  got = attention.attend_cudnn(q, k, v, implementation='xla')
  assert got.dtype == dtype
  want = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# The choice.


@pytest.mark.parametrize('platform,dtype,expected', [
    ('tpu', 'float32', 'pallas_tpu'), ('tpu', 'bfloat16', 'pallas_tpu'),
    ('gpu', 'bfloat16', 'cudnn'), ('cuda', 'bfloat16', 'cudnn'), ('gpu', 'float32', 'xla'),
    ('rocm', 'bfloat16', 'xla'), ('cpu', 'float32', 'per_head'), ('cpu', 'bfloat16', 'per_head'),
])
def test_auto_follows_the_platform(platform, dtype, expected):
  assert attention.resolve_attention('auto', platform, dtype) == expected


def test_explicit_choices_override():
  assert attention.resolve_attention('xla', 'tpu') == 'xla'
  assert attention.resolve_attention('per_head', 'gpu') == 'per_head'
  assert attention.resolve_attention('xla', 'cpu') == 'xla'
  assert attention.resolve_attention('pallas_tpu', 'tpu', 'bfloat16') == 'pallas_tpu'
  assert attention.resolve_attention('cudnn', 'gpu', 'bfloat16') == 'cudnn'


@pytest.mark.parametrize('name,platform,dtype,message', [
    ('flash', 'tpu', 'float32', r"config\.model\.attention='flash' is not one of auto, xla, "
                                r"per_head, pallas_tpu, cudnn\."),
    ('pallas_tpu', 'cpu', 'float32', r"'pallas_tpu' needs TPU devices.*'cpu'"),
    ('cudnn', 'tpu', 'bfloat16', r"'cudnn' needs NVIDIA GPUs.*'tpu'"),
    ('cudnn', 'gpu', 'float32', r"'cudnn' needs config\.model\.dtype='bfloat16'"),
])
def test_impossible_choices_name_the_key(name, platform, dtype, message):
  with pytest.raises(UserError, match=message):
    attention.resolve_attention(name, platform, dtype)


def test_build_model_resolves_for_the_given_platform():
  from segvit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import segvit  # pylint: disable=g-import-not-at-top
  m = config_lib.get_base_config().model
  assert segvit.build_model(m, platform='tpu').attention == 'pallas_tpu'
  assert segvit.build_model(m, platform='cpu').attention == 'per_head'
  assert segvit.build_model(m).attention == attention.resolve_attention(
      'auto', jax.default_backend())
  m.attention = 'xla'
  assert segvit.build_model(m, platform='tpu').attention == 'xla'
