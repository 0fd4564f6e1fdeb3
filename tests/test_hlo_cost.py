"""segvit_jax.aot.hlo_cost: FLOPs, bytes and HBM bytes of compiled programs, loops counted fully."""

import jax
import jax.numpy as jnp
import pytest

from segvit_jax.aot import hlo_cost

CPU = jax.devices('cpu')[0].client


def _cost(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return hlo_cost.program_cost(compiled.as_text(), CPU)


def test_loop_bodies_count_as_often_as_they_run():
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 256, 256), jnp.float32)
  matmul = 2 * 64 * 256 * 256

  def unrolled(x, w):
    for i in range(8):
      x = jnp.tanh(x @ w[i])
    return x

  def scanned(x, w):
    return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

  def nested(x, w):  # 8 x 3 matmuls
    def outer(x, wi):
      return jax.lax.scan(lambda x, j: (jnp.tanh(x @ wi) + j, None), x, jnp.arange(3.0))[0], None
    return jax.lax.scan(outer, x, w)[0]

  def from_two(x, w):  # 6 iterations
    return jax.lax.fori_loop(2, 8, lambda i, x: jnp.tanh(x @ w[i]), x)

  def skipped_windows(x, w):  # a cond in the body: the branch that runs the matmul counts
    def body(x, i):
      return jax.lax.cond(x[0, 0] > i, lambda x: jnp.tanh(x @ w[i]), lambda x: x, x), None
    return jax.lax.scan(body, x, jnp.arange(8))[0]

  def gradient(x, w):  # forward and backward loops: 8 + 16 matmuls
    return jax.grad(lambda w: scanned(x, w).sum())(w)

  xla_once = jax.jit(scanned).lower(x, w).compile().cost_analysis()['flops']
  assert xla_once == pytest.approx(matmul, rel=0.01)  # what XLA alone reports: one iteration
  for fn, matmuls in ((unrolled, 8), (scanned, 8), (nested, 24), (from_two, 6),
                      (skipped_windows, 8), (gradient, 24)):
    cost = _cost(fn, x, w)
    assert cost['flops'] == pytest.approx(matmuls * matmul, rel=0.01), fn.__name__
    assert cost['uncounted_loops'] == 0
  assert _cost(scanned, x, w)['bytes'] > 8 * 256 * 256 * 4  # every weight read
  assert _cost(scanned, x, w)['unpriced'] == 0




_U32_LOOP = """HloModule windowed

%body (p: (u32[], f32[64,64])) -> (u32[], f32[64,64]) {
  %p = (u32[], f32[64,64]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %one = u32[] constant(1)
  %next = u32[] add(%i, %one)
  %x = f32[64,64] get-tuple-element(%p), index=1
  %y = f32[64,64] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (u32[], f32[64,64]) tuple(%next, %y)
}

%cond (p: (u32[], f32[64,64])) -> pred[] {
  %p = (u32[], f32[64,64]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %n = u32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[64,64]) -> (u32[], f32[64,64]) {
  %x = f32[64,64] parameter(0)
  %zero = u32[] constant(0)
  %init = (u32[], f32[64,64]) tuple(%zero, %x)
  ROOT %w = (u32[], f32[64,64]) while(%init), condition=%cond, body=%body
}
"""


def test_loops_with_unsigned_counters_count_too():
  # The SPMD partitioner's windowed-einsum loops count with u32 (no known_trip_count).
  cost = hlo_cost.program_cost(_U32_LOOP, CPU)
  assert cost['uncounted_loops'] == 0
  assert cost['flops'] == pytest.approx(8 * 2 * 64**3, rel=0.01)


# A TPU-style program after memory-space assignment: `w` lives in HBM, `x` was placed on chip
# (S(1)); an asynchronous copy brings `w` on chip and the exponential writes back to HBM.
_ON_CHIP = """HloModule spaces

ENTRY %main (x: f32[256,256], w: f32[256,256]) -> f32[256,256] {
  %x = f32[256,256]{1,0:T(8,128)S(1)} parameter(0)
  %w = f32[256,256]{1,0:T(8,128)} parameter(1)
  %start = (f32[256,256]{1,0:T(8,128)}, f32[256,256]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%w)
  %near = f32[256,256]{1,0:T(8,128)S(1)} copy-done(%start)
  %sum = f32[256,256]{1,0:T(8,128)S(1)} add(%x, %near)
  ROOT %out = f32[256,256]{1,0:T(8,128)} exponential(%sum)
}
"""


def test_hbm_bytes_leave_out_on_chip_buffers():
  array = 256 * 256 * 4
  cost = hlo_cost.program_cost(_ON_CHIP, CPU)
  # copy: read w + write its on-chip copy; add: 2 reads + 1 write; exponential: 1 read + 1 write.
  assert cost['bytes'] == pytest.approx(7 * array)
  # Through HBM: the copy's read of w and the exponential's write of the result.
  assert cost['hbm_bytes'] == pytest.approx(2 * array)
  assert cost['flops'] == pytest.approx(256 * 256)  # the add (exponentials are transcendentals)
  assert cost['unpriced'] == 0


def test_unparsable_instructions_are_priced_by_their_shapes():
  # An instruction XLA cannot parse on its own (a custom call it does not know) still counts its
  # operands and outputs, and a kernel's cost estimate gives its FLOPs.
  text = """HloModule kernel

ENTRY %main (x: f32[128,128]) -> f32[128,128] {
  %x = f32[128,128]{1,0} parameter(0)
  ROOT %k = f32[128,128]{1,0:S(1)} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "Zm9v", "cost_estimate":{"flops":"4096","bytes_accessed":"1"}, broken
}
"""
  cost = hlo_cost.program_cost(text, CPU)
  assert cost['unpriced'] == 1
  assert cost['flops'] == 4096
  assert cost['bytes'] == 2 * 128 * 128 * 4 and cost['hbm_bytes'] == 128 * 128 * 4
