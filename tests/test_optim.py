"""The optimizer recipe against an independent reference: torch AdamW with mmcv's groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from segvit_jax import config as config_lib
from segvit_jax import optim
from segvit_jax.data.datasets import coco_stuff10k


def mmcv_lr(it, base, max_iters, power, min_lr, warmup, ratio):
  """mmcv 1.4.4 PolyLrUpdaterHook + linear warmup, literally, in float64."""
  coeff = (1 - it / max_iters) ** power
  regular = (base - min_lr) * coeff + min_lr
  if warmup and it < warmup:
    k = (1 - it / warmup) * (1 - ratio)
    return regular * (1 - k)
  return regular


@pytest.mark.parametrize('power,min_lr,max_iters', [(1.0, 0.0, 160_000), (2.0, 0.0, 80_000),
                                                    (0.9, 1e-7, 40_000)])
def test_schedule_matches_mmcv(power, min_lr, max_iters):
  schedule = optim.poly_warmup_schedule(
      2e-5, max_iters, power=power, min_lr=min_lr, warmup_steps=1500, warmup_ratio=1e-6)
  its = [0, 1, 2, 10, 749, 1498, 1499, 1500, 1501, 5000, max_iters // 2, max_iters - 2,
         max_iters - 1]
  got = np.asarray(jax.vmap(schedule)(jnp.asarray(its)))
  want = np.asarray([mmcv_lr(i, 2e-5, max_iters, power, min_lr, 1500, 1e-6) for i in its])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # The first update uses lr * ratio: the warmup starts from 2e-11, not from 0.
  assert got[0] == pytest.approx(2e-5 * 1e-6, rel=1e-6)
  # Never negative past the end.
  assert float(schedule(max_iters + 10)) == pytest.approx(min_lr, abs=1e-12)


def test_schedule_from_config_uses_recipe_keys():
  config = config_lib.get_base_config()
  coco_stuff10k.recipe(config)
  schedule = optim.schedule_from_config(config)
  for it in (0, 1499, 1500, 40_000, 79_999):
    want = mmcv_lr(it, 2e-5, 80_000, 2.0, 0.0, 1500, 1e-6)
    assert float(schedule(it)) == pytest.approx(want, rel=1e-6)


def _tiny_params(rng):
  """A parameter tree shaped like the model's: backbone blocks with ln1/ln2, and a head."""
  def a(*shape):
    return rng.normal(size=shape).astype(np.float32)
  return {
      'backbone': {
          'patch_embed': {'kernel': a(2, 2, 3, 4), 'bias': a(4)},
          'pos_embed': a(1, 5, 4),
          'block_0': {
              'ln1': {'scale': 1 + 0.1 * a(4), 'bias': a(4)},
              'attn': {'qkv': {'kernel': a(4, 12), 'bias': a(12)}},
              'ln2': {'scale': 1 + 0.1 * a(4), 'bias': a(4)},
              'mlp': {'fc1': {'kernel': a(4, 8), 'bias': a(8)}},
          },
      },
      'head': {
          'q': {'embedding': a(3, 4)},
          'norm1': {'scale': 1 + 0.1 * a(4), 'bias': a(4)},
          'class_embed': {'kernel': a(4, 4), 'bias': a(4)},
      },
  }


# The groups written out by hand (as mmcv 1.4.4's `DefaultOptimizerConstructor` forms them),
# independent of optim's path rules.
_NO_DECAY = {'backbone/block_0/ln1/scale', 'backbone/block_0/ln1/bias',
             'backbone/block_0/ln2/scale', 'backbone/block_0/ln2/bias'}


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_groups_by_hand():
  params = _tiny_params(np.random.default_rng(0))
  mask = _flat(optim.weight_decay_mask(params))
  mults = _flat(optim.lr_multipliers(params, 10.0))
  for name in mask:
    assert mask[name] == (name not in _NO_DECAY), name
    assert mults[name] == (10.0 if name.startswith('head/') else 1.0), name
  # The head's own LayerNorm ('norm1') keeps its weight decay: 'head' wins in mmcv.
  assert mask['head/norm1/scale']


def _optim_config(**overrides):
  config = config_lib.get_base_config()
  config.num_train_steps = 6
  o = config.optim
  o.learning_rate = 1e-2
  o.weight_decay = 0.05
  o.warmup_steps = 2
  o.warmup_ratio = 0.1
  o.poly_power = 2.0
  o.min_lr = 1e-4
  o.grad_clip_norm = 3.0
  for k, v in overrides.items():
    setattr(o, k, v)
  return config


def test_adamw_matches_torch_param_groups():
  config = _optim_config()
  o = config.optim
  rng = np.random.default_rng(1)
  params = _tiny_params(rng)
  names = list(_flat(params))
  num_steps = 4
  # Step 1's gradients are large so the global-norm clip at 3.0 engages; the others are not.
  grads_per_step = []
  for i in range(num_steps):
    g = {n: rng.normal(size=v.shape).astype(np.float32) * (0.05 if i != 1 else 5.0)
         for n, v in _flat(params).items()}
    grads_per_step.append(g)

  # torch reference, groups by hand.
  tparams = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in _flat(params).items()}
  groups = [
      {'params': [tparams[n] for n in names if n.startswith('head/')], 'lr_mult': 10.0,
       'weight_decay': o.weight_decay},
      {'params': [tparams[n] for n in names if n.startswith('backbone/') and n not in _NO_DECAY],
       'lr_mult': 1.0, 'weight_decay': o.weight_decay},
      {'params': [tparams[n] for n in names if n in _NO_DECAY], 'lr_mult': 1.0,
       'weight_decay': 0.0},
  ]
  topt = torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.b1, o.b2), eps=1e-8)
  for i in range(num_steps):
    lr = mmcv_lr(i, o.learning_rate, config.num_train_steps, o.poly_power, o.min_lr,
                 o.warmup_steps, o.warmup_ratio)
    for g in topt.param_groups:
      g['lr'] = lr * g['lr_mult']
    for n, p in tparams.items():
      p.grad = torch.tensor(grads_per_step[i][n])
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), o.grad_clip_norm)
    topt.step()

  # optax.
  tx, schedule = optim.make_optimizer(config)
  jparams = jax.tree.map(jnp.asarray, params)
  state = tx.init(jparams)
  update = jax.jit(tx.update)
  for i in range(num_steps):
    grads = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(grads_per_step[i]['/'.join(str(k.key) for k in path)]),
        jparams)
    updates, state = update(grads, state, jparams)
    jparams = optax.apply_updates(jparams, updates)

  got, start = _flat(jparams), _flat(params)
  for n in names:
    want = tparams[n].detach().numpy()
    # torch rounds twice per step (decay, then Adam), optax once: a few float32 ulps apart.
    np.testing.assert_allclose(np.asarray(got[n]), want, rtol=1e-6, atol=1e-6, err_msg=n)
    # The moves (O(lr) to O(10 lr), decay terms O(lr * wd) = 5e-4) agree far below any
    # grouping, clipping or schedule mistake.
    np.testing.assert_allclose(np.asarray(got[n]) - start[n], want - start[n], rtol=1e-5,
                               atol=1e-6, err_msg=n)
  assert float(schedule(0)) == pytest.approx(o.learning_rate * o.warmup_ratio, rel=1e-6)


def test_real_model_groups():
  """On the model's own tree: only backbone ln1/ln2 lose decay; everything under 'head' is x10."""
  from segvit_jax.models import segvit
  config = config_lib.get_base_config()
  m = config.model
  m.img_size = (32, 32)
  m.embed_dim, m.depth, m.num_heads = 16, 3, 2
  m.out_indices = (0, 1, 2)
  m.decoder_dim, m.decoder_heads = 16, 2
  m.num_classes = 3
  model = segvit.build_model(m)
  shapes = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False))
  params = jax.tree.map(lambda x: x, shapes['params'])
  from flax import linen as nn
  params = nn.unbox(params)
  mask = _flat(optim.weight_decay_mask(params))
  no_decay = sorted(n for n, v in mask.items() if not v)
  # The blocks are one scanned segment: ln1/ln2 scale and bias, each with a leading block axis.
  assert no_decay == [f'backbone/blocks_0_2/{ln}/{p}' for ln in ('ln1', 'ln2')
                      for p in ('bias', 'scale')], no_decay
  flat_params = _flat(params)
  assert all(flat_params[n].shape == (m.depth, m.embed_dim) for n in no_decay)
  mults = _flat(optim.lr_multipliers(params, 10.0))
  assert any(n.startswith('head/') for n in mults)
  for n, v in mults.items():
    assert v == (10.0 if n.startswith('head/') else 1.0), n
  summary = optim.group_summary(params)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert summary.head + summary.backbone_decay + summary.backbone_no_decay == total
  assert summary.backbone_no_decay == 4 * m.depth * m.embed_dim
