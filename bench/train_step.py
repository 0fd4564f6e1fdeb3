r"""Compile time and step time of one jitted SegViT training step (model + ATM loss + AdamW).

  .venv/bin/python bench/train_step.py --config=configs/ade20k_base.py --batch_size=2

Random images and labels at the config's crop size, on whatever devices JAX sees (the data axis of
a `data:-1` mesh is not used: this measures one step on the default device). Prints one line per
measurement and a JSON summary at the end.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from segvit_jax import losses  # noqa: E402
from segvit_jax import optim  # noqa: E402
from segvit_jax.models import segvit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', 2, 'Batch size of the measured step.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps after the first (compiling) one.')
_DTYPE = flags.DEFINE_string('dtype', None, 'Override config.model.dtype (float32/bfloat16).')


def main(argv):
  del argv
  config = _CONFIG.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  model = segvit.build_model(config.model)
  tx, _ = optim.make_optimizer(config)
  h, w = config.dataset.crop_size
  k = config.model.num_classes
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(_BATCH.value, h, w, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, k, size=(_BATCH.value, h, w)), jnp.int32)

  params = jax.jit(lambda: nn.unbox(model.init({'params': jax.random.key(0)}, images[:1],
                                               train=False))['params'])()
  opt_state = jax.jit(tx.init)(params)

  def train_step(params, opt_state, images, labels, step):
    def loss_fn(p):
      outputs = model.apply({'params': p}, images, train=True,
                            rngs={'dropout': jax.random.fold_in(jax.random.key(1), step)})
      return losses.atm_loss(outputs, labels, num_classes=k, **config.loss)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree_util.tree_map(jnp.add, params, updates), opt_state, loss

  step_fn = jax.jit(train_step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step_fn.lower(params, opt_state, images, labels, 0).compile()
  compile_s = time.perf_counter() - t0
  print(f'compile: {compile_s:.2f} s', flush=True)

  times = []
  for i in range(_STEPS.value + 1):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, images, labels, i)
    loss = float(loss)
    times.append(time.perf_counter() - t0)
    print(f'step {i}: {times[-1]:.3f} s  loss {loss:.4f}', flush=True)
  steady = times[1:] or times
  summary = {
      'config': config.model.name, 'embed_dim': config.model.embed_dim, 'crop': [h, w],
      'batch_size': _BATCH.value, 'dtype': config.model.dtype, 'devices': str(jax.devices()[0]),
      'compile_s': round(compile_s, 2), 'first_step_s': round(times[0], 3),
      'step_s_median': round(float(np.median(steady)), 3),
      'images_per_s': round(_BATCH.value / float(np.median(steady)), 3),
  }
  print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
