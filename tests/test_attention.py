"""The per-head attention (CPU fast path with its own backward) against the batched formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax.models import layers


def reference(q, k, v):
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


def _inputs(nq, nk, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(0, 1.5, (2, nq, 3, 8))  # large logits: a peaked softmax tests the max shift
  k, v = rng.normal(0, 1.5, (2, nk, 3, 8)), rng.normal(size=(2, nk, 3, 8))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize('nq,nk', [(24, 24), (6, 24), (24, 7)])  # self, QD (fewer queries), cross
def test_per_head_forward_and_gradients_match(nq, nk):
  q, k, v = _inputs(nq, nk)
  np.testing.assert_allclose(layers.attend_per_head(q, k, v), reference(q, k, v), rtol=1e-5,
                             atol=1e-6)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=(2, nq, 3, 8)), jnp.float32)
  grads = jax.grad(lambda *a: jnp.sum(layers.attend_per_head(*a) * probe), argnums=(0, 1, 2))
  expected = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2))
  for name, got, want in zip('qkv', grads(q, k, v), expected(q, k, v)):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 1e-3, name
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=name)


def test_per_head_in_bfloat16_keeps_float32_statistics():
  q, k, v = _inputs(24, 24, jnp.bfloat16)
  got = layers.attend_per_head(q, k, v)
  assert got.dtype == jnp.bfloat16
  want = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_attend_chooses_the_per_head_path_only_for_large_maps(monkeypatch):
  calls = []
  monkeypatch.setattr(layers, 'attend_per_head', lambda *a: calls.append(1) or reference(*a))
  monkeypatch.setattr(layers, 'PER_HEAD_MIN_SIZE', 24 * 24)
  q, k, v = _inputs(24, 24)
  jax.jit(layers.attend)(q, k, v)
  assert calls == ([1] if jax.default_backend() == 'cpu' else [])
  jax.jit(layers.attend)(*_inputs(6, 24))  # 144 < 576: the batched formula
  assert len(calls) == (1 if jax.default_backend() == 'cpu' else 0)
