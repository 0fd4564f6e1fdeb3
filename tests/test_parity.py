"""Layer-by-layer parity: official-layout PyTorch model -> mmcv checkpoint -> CLI -> JAX model.

A small model of each variant (plain ViT + ATMHead, vit_shrink + TPNATMHead) is built with the
PyTorch reference `segvit_reference` (written from the official code, with the official
state-dict keys), given noisy weights that make the outputs informative, saved as an mmcv
checkpoint whose `meta['config']` describes it, and converted with
`python -m segvit_jax.convert`. On the same inputs we compare, in float32:
  every backbone tap, every stage's / layer's mask logits (and the QU features of the shrunk
  head), the final and auxiliary class logits and mask logits, the final scores, and every term
  of the ATM loss;
on a square input at the stored size, a non-square input and a larger square input (the last two
resize the position grid at run time). Error = max |jax - torch| / max |torch| per tensor.
"""

import collections
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segvit_jax import losses
from segvit_jax.evaluation import predictor
from segvit_jax.models import atm
from segvit_jax.models import segvit
import segvit_reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
IMG = 64
NUM_CLASSES = 7
VARIANTS = {
    'plain': dict(kind='plain', out_indices=(1, 2, 3)),
    'shrunk': dict(kind='shrunk', out_indices=(1, 3), shrink_idx=2),
}
# (H, W) inputs per variant: the stored size (with the loss), non-square, larger square.
SHAPES = {'plain': [(64, 64), (64, 96), (96, 96)], 'shrunk': [(64, 64), (96, 64)]}
CASES = [(v, s) for v in VARIANTS for s in SHAPES[v]]

WORST = collections.defaultdict(float)  # tensor name -> largest relative error seen


@pytest.fixture(scope='module', autouse=True)
def report_worst_errors():
  """Prints the largest relative error per compared tensor at the end (visible with -s)."""
  yield
  if WORST:
    width = max(map(len, WORST))
    print('\nlargest relative error per tensor (max |jax - torch| / max |torch|):')
    for name, err in sorted(WORST.items()):
      print(f'  {name:<{width}}  {err:.2e}')


def run_cli(*args, check=True):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'segvit_jax.convert', *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='session')
def converted(tmp_path_factory):
  """variant -> (reference model, converted model, variables, config); converted once each."""
  cache = {}

  def get(variant):
    if variant not in cache:
      torch.manual_seed(0)
      kwargs = VARIANTS[variant]
      model = ref.init_with_noise(ref.build(**kwargs, img_size=IMG, num_classes=NUM_CLASSES),
                                  seed=1).eval()
      tmp = tmp_path_factory.mktemp(variant)
      src, dst = tmp / 'segvit.pth', tmp / 'converted'
      ref.save_mmcv_checkpoint(
          model, src, ref.config_text(**kwargs, img_size=IMG, num_classes=NUM_CLASSES),
          classes=[f'class{i}' for i in range(NUM_CLASSES)],
          palette=[[i, 2 * i, 3 * i] for i in range(NUM_CLASSES)])
      run_cli(src, dst)
      jax_model, variables, config = predictor.load_checkpoint(str(dst))
      cache[variant] = (model, jax_model, variables, config)
    return cache[variant]

  return get


def rel_err(name, got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f'{name}: jax {got.shape} vs torch {want.shape}'
  err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  WORST[name] = max(WORST[name], err)
  return err


def labels_for(shape, seed=0):
  """(2, H, W) int labels: blocks of 3-4 classes per image plus an ignore (255) region."""
  rng = np.random.default_rng(seed)
  h, w = shape
  labels = np.empty((2, h, w), np.int64)
  for b, classes in enumerate(([0, 2, 5], [1, 3, 4, 6])):
    coarse = rng.choice(classes, size=(h // 16, w // 16))
    labels[b] = np.kron(coarse, np.ones((16, 16), np.int64))
  labels[0, :8, :20] = 255
  return labels


def _decoder_calls(inter, *path):
  node = inter
  for p in path:
    node = node[p]
  (outputs, masks), = node['__call__']
  return outputs, masks


@pytest.mark.parametrize('variant,shape', CASES)
def test_parity(converted, variant, shape):
  torch_model, model, variables, config = converted(variant)
  h, w = shape
  generator = torch.Generator().manual_seed(h * 1000 + w)
  images = torch.randn(2, 3, h, w, generator=generator)
  with torch.no_grad():
    want = torch_model.forward_all(images)

  # The outputs must carry signal, or agreeing on them proves little.
  final_masks = want['masks'][-1]
  assert 0.3 < float(final_masks.std(dim=(2, 3)).mean()) < 30, 'mask logits lack spatial signal'
  for b in range(2):
    assert len(want['scores'][b].argmax(0).unique()) >= 2, 'a single class wins everywhere'

  with_loss = shape == (IMG, IMG)  # the official loss assumes label size == img_size
  train_config = config.model.copy_and_resolve_references()
  train_config.decoder_dropout = 0.0
  train_config.drop_path_rate = 0.0
  train_model = segvit.build_model(train_config)
  labels = labels_for(shape)

  # Eager on purpose: for a single call, XLA:CPU compiling the whole graph costs ~3x more CPU
  # time than dispatching the ops one by one.
  def forward(v, x, y):
    scores, state = model.apply(
        v, x, train=False, mutable=['intermediates'],
        capture_intermediates=lambda mdl, _: isinstance(mdl, atm.Decoder))
    if not with_loss:
      return scores, state['intermediates'], None, None
    out = train_model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)})
    _, terms = losses.atm_loss(out, y, num_classes=NUM_CLASSES,
                               no_object_weight=config.loss.no_object_weight)
    return scores, state['intermediates'], out, terms

  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  scores, inter, out, terms = forward(variables, x, jnp.asarray(labels, jnp.int32))
  errors = {}
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()

  # Backbone taps: (B, h, w, D) here; (B, D, h, w) maps (plain) or (B, N, D) tokens (shrunk).
  for i, tap, grid in zip(config.model.out_indices, want['taps'], want['grids']):
    got = inter['backbone'][f'tap_{i}'][0]
    if variant == 'plain':
      errors[f'backbone tap {i}'] = rel_err(f'{variant}/tap', got, nhwc(tap))
    else:
      errors[f'backbone tap {i}'] = rel_err(f'{variant}/tap', got.reshape(2, -1, got.shape[-1]),
                                            tap.numpy())
  # Mask logits of every stage (plain: the stage's last layer, before the cumulative sum) or of
  # every ATM layer (shrunk); (B, K, h*w) in both implementations.
  if variant == 'plain':
    stage_masks = [_decoder_calls(inter, 'head', f'decoder_{s + 1}')[1][-1]
                   for s in range(len(want['stage_logits']))]
  else:
    stage_masks = list(_decoder_calls(inter, 'head', 'atm', 'decoder_1')[1])
    qu_outputs, _ = _decoder_calls(inter, 'head', f'decoder_{config.model.use_stages}')
    errors['QU features'] = rel_err(f'{variant}/QU features', qu_outputs[-1],
                                    want['qu_features'].numpy())
  assert len(stage_masks) == len(want['stage_logits'])
  for s, (got, stage) in enumerate(zip(stage_masks, want['stage_logits'])):
    errors[f'stage {s + 1} mask logits'] = rel_err(f'{variant}/stage mask logits', got,
                                                   stage.flatten(2).numpy())
  errors['scores'] = rel_err(f'{variant}/scores', scores, nhwc(want['scores']))

  if with_loss:
    errors['class logits'] = rel_err(f'{variant}/class logits', out['class_logits'],
                                     want['pred_logits'].numpy())
    errors['mask logits'] = rel_err(f'{variant}/mask logits', out['mask_logits'],
                                    nhwc(want['masks'][-1]))
    assert len(out['aux']) == len(want['aux_outputs'])
    for i, (got, aux) in enumerate(zip(out['aux'], want['aux_outputs'])):
      errors[f'aux {i} class logits'] = rel_err(f'{variant}/aux class logits',
                                                got['class_logits'], aux['pred_logits'].numpy())
      errors[f'aux {i} mask logits'] = rel_err(f'{variant}/aux mask logits', got['mask_logits'],
                                               nhwc(aux['pred_masks']))
    want_terms = ref.atm_loss(want, torch.as_tensor(labels), NUM_CLASSES)
    assert sorted(terms) == sorted(want_terms)
    for k, v in want_terms.items():
      assert float(v) > 1e-3, f'{k} is ~0: a degenerate loss comparison'
      errors[k] = rel_err(f'{variant}/{k}', terms[k], float(v))

  print(f'\n{variant} {shape}: ' + ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
  bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
  assert not bad, f'relative errors above {TOLERANCE}: {bad}'
