"""ATM loss vs an independent per-image numpy reference written from the official
`losses/atm_loss.py`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvit_jax import losses

IGNORE = 255


# ---------------------------------------------------------------------------------------------
# Reference: the official per-image formulation (target lists, loops), float64, torch interpolate.


def _ref_upsample(masks_khw: np.ndarray, size) -> np.ndarray:
  """(n, h, w) -> (n, H, W) with PyTorch bilinear, align_corners=False, in float64."""
  if masks_khw.shape[1:] == tuple(size):
    return masks_khw
  t = torch.from_numpy(masks_khw[:, None].astype(np.float64))
  return F.interpolate(t, size=tuple(size), mode='bilinear', align_corners=False)[:, 0].numpy()


def _ref_targets(labels: np.ndarray):
  """Per image: the sorted classes present (labels != 255) and their binary masks."""
  targets = []
  for lab in labels:
    classes = np.unique(lab[lab != IGNORE])
    masks = np.stack([lab == c for c in classes]) if len(classes) else np.zeros((0,) + lab.shape)
    targets.append((classes, masks.astype(np.float64)))
  return targets


def _ref_ce(logits: np.ndarray, targets, num_classes: int, eos: float) -> float:
  b, k, _ = logits.shape
  target_classes = np.full((b, k), num_classes, np.int64)
  for i, (classes, _) in enumerate(targets):
    target_classes[i, classes] = classes  # query c <-> class c
  weight = np.ones(num_classes + 1)
  weight[-1] = eos
  x = logits.astype(np.float64)
  logz = np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)
  nll = logz - np.take_along_axis(x, target_classes[..., None], -1)[..., 0]
  w = weight[target_classes]
  return float(np.sum(w * nll) / np.sum(w))


def _ref_focal(x: np.ndarray, t: np.ndarray, num_masks: float) -> float:
  x = x.reshape(len(x), -1)
  t = t.reshape(len(t), -1)
  p = 1 / (1 + np.exp(-x))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  loss = ce * (1 - p_t) ** 2
  loss = (0.25 * t + 0.75 * (1 - t)) * loss
  return float(loss.mean(1).sum() / num_masks)


def _ref_dice(x: np.ndarray, t: np.ndarray, num_masks: float) -> float:
  p = (1 / (1 + np.exp(-x))).reshape(len(x), -1)
  t = t.reshape(len(t), -1)
  loss = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
  return float(loss.sum() / num_masks)


def reference_atm_loss(outputs, labels, num_classes, eos=0.1, wc=1.0, wm=20.0, wd=1.0):
  labels = np.asarray(labels)
  targets = _ref_targets(labels)
  num_masks = max(float(sum(len(c) for c, _ in targets)), 1.0)
  named = [('', outputs)] + [(f'_{i}', a) for i, a in enumerate(outputs['aux'])]
  terms = {}
  for suffix, out in named:
    logits = np.asarray(out['class_logits'], np.float64)
    masks = np.asarray(out['mask_logits'], np.float64)  # (B, h, w, K)
    src, tgt = [], []
    for b, (classes, tmasks) in enumerate(targets):
      if len(classes):
        src.append(_ref_upsample(np.moveaxis(masks[b], -1, 0)[classes], labels.shape[1:]))
        tgt.append(tmasks)
    if src:
      src, tgt = np.concatenate(src), np.concatenate(tgt)
      focal, dice = _ref_focal(src, tgt, num_masks), _ref_dice(src, tgt, num_masks)
    else:
      focal = dice = 0.0
    terms['loss_ce' + suffix] = wc * _ref_ce(logits, targets, num_classes, eos)
    terms['loss_mask' + suffix] = wm * focal
    terms['loss_dice' + suffix] = wd * dice
  return sum(terms.values()), terms


# ---------------------------------------------------------------------------------------------


def _outputs(rng, batch, num_classes, mask_hw, aux_hw=None, num_aux=2, scale=3.0):
  def one(hw):
    return {'class_logits': rng.normal(size=(batch, num_classes, num_classes + 1)) * scale,
            'mask_logits': rng.normal(size=(batch, *hw, num_classes)) * scale}
  out = one(mask_hw)
  out['aux'] = tuple(one(aux_hw or mask_hw) for _ in range(num_aux))
  return jax.tree.map(lambda a: np.asarray(a, np.float32), out)


def _labels(rng, batch, hw, classes_used):
  lab = rng.choice(np.asarray(classes_used), size=(batch, *hw)).astype(np.int32)
  return lab


def _jit_loss(num_classes):
  return jax.jit(functools.partial(losses.atm_loss, num_classes=num_classes))


def _compare(outputs, labels, num_classes):
  total, terms = _jit_loss(num_classes)(outputs, jnp.asarray(labels))
  ref_total, ref_terms = reference_atm_loss(outputs, labels, num_classes)
  assert set(terms) == set(ref_terms)
  for name in ref_terms:
    np.testing.assert_allclose(float(terms[name]), ref_terms[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
  np.testing.assert_allclose(float(total), float(sum(terms.values())), rtol=1e-6)
  return terms, ref_terms


def test_random_labels_with_ignore_regions():
  rng = np.random.default_rng(0)
  k = 7
  labels = _labels(rng, 3, (32, 48), [0, 2, 3, 5, IGNORE])
  labels[0, :10, :20] = IGNORE  # a padding-like block
  labels[2] = np.where(labels[2] == 5, 6, labels[2])
  outputs = _outputs(rng, 3, k, (32, 48))
  terms, _ = _compare(outputs, labels, k)
  assert set(terms) == {f'loss_{n}{s}' for n in ('ce', 'mask', 'dice') for s in ('', '_0', '_1')}
  for name in terms:
    assert float(terms[name]) > 0, name


def test_image_without_valid_pixels_in_batch():
  rng = np.random.default_rng(1)
  k = 5
  labels = _labels(rng, 3, (16, 24), [1, 4, IGNORE])
  labels[1] = IGNORE  # contributes no masks, only "no object" class targets
  outputs = _outputs(rng, 3, k, (16, 24))
  _compare(outputs, labels, k)


def test_no_valid_pixel_anywhere_clamps_num_masks():
  rng = np.random.default_rng(2)
  k = 4
  labels = np.full((2, 16, 16), IGNORE, np.int32)
  outputs = _outputs(rng, 2, k, (16, 16))
  terms, _ = _compare(outputs, labels, k)
  for name, value in terms.items():
    if name.startswith('loss_ce'):
      assert float(value) > 0
    else:
      assert float(value) == 0.0, name


def test_masks_below_label_resolution_are_upsampled():
  rng = np.random.default_rng(3)
  k = 6
  labels = _labels(rng, 2, (32, 48), [0, 1, 5, IGNORE])
  # Final mask at 1/2 of the label, aux masks at 1/16 (token resolution) as in training.
  outputs = _outputs(rng, 2, k, (16, 24), aux_hw=(2, 3))
  _compare(outputs, labels, k)


def test_many_classes_few_present():
  rng = np.random.default_rng(4)
  k = 40
  labels = _labels(rng, 2, (24, 24), [3, 17, 39, IGNORE])
  labels[1, :12] = 0
  outputs = _outputs(rng, 2, k, (3, 3), num_aux=1)
  terms, _ = _compare(outputs, labels, k)
  assert 'loss_ce_1' not in terms


@pytest.mark.parametrize('slots', [1, 3, 4, 12])
def test_present_class_slots_give_the_same_loss_and_gradient(slots):
  """Images with 3 and 4 classes: slots 1 and 3 take the all-classes fallback, 4 and 12 gather."""
  rng = np.random.default_rng(5)
  k = 12
  labels = _labels(rng, 2, (24, 32), [2, 7, 11, IGNORE])
  labels[1, :6] = 0
  outputs = _outputs(rng, 2, k, (6, 8), num_aux=1)
  ref_total, _ = reference_atm_loss(outputs, labels, k)

  def loss(outs, slots):
    return losses.atm_loss(outs, jnp.asarray(labels), num_classes=k, mask_slots=slots)[0]

  total = jax.jit(loss, static_argnums=1)(outputs, slots)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
  grad = jax.jit(jax.grad(loss), static_argnums=1)(outputs, slots)
  full = jax.jit(jax.grad(loss), static_argnums=1)(outputs, k)
  for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(full)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_weights_and_no_object_weight_are_applied():
  rng = np.random.default_rng(5)
  k = 5
  labels = _labels(rng, 2, (16, 16), [0, 2, IGNORE])
  outputs = _outputs(rng, 2, k, (4, 4))
  base = functools.partial(losses.atm_loss, num_classes=k)
  _, t1 = jax.jit(base)(outputs, labels)
  _, t2 = jax.jit(functools.partial(base, cls_weight=2.0, mask_weight=3.0, dice_weight=0.5,
                                    no_object_weight=0.7))(outputs, labels)
  _, ref = reference_atm_loss(outputs, labels, k, eos=0.7, wc=2.0, wm=3.0, wd=0.5)
  np.testing.assert_allclose(float(t2['loss_mask']), 3.0 / 20.0 * float(t1['loss_mask']),
                             rtol=1e-6)
  np.testing.assert_allclose(float(t2['loss_dice']), 0.5 * float(t1['loss_dice']), rtol=1e-6)
  for name in ref:
    np.testing.assert_allclose(float(t2[name]), ref[name], rtol=1e-5, err_msg=name)


def test_gradient_is_finite_and_nonzero():
  rng = np.random.default_rng(6)
  k = 5
  labels = _labels(rng, 2, (16, 16), [0, 3, IGNORE])
  outputs = _outputs(rng, 2, k, (4, 4))
  grad_fn = jax.jit(jax.grad(lambda o: losses.atm_loss(o, labels, num_classes=k)[0]))
  grads = grad_fn(outputs)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).sum() > 0, path
  # Masks of absent classes get no gradient (only present pairs enter the mask losses).
  absent = [c for c in range(k) if c not in (0, 3)]
  assert np.all(np.asarray(grads['mask_logits'])[..., absent] == 0)
  assert np.abs(np.asarray(grads['mask_logits'])[..., [0, 3]]).sum() > 0


def test_bfloat16_inputs_under_jit():
  rng = np.random.default_rng(7)
  k = 6
  labels = _labels(rng, 2, (32, 32), [1, 2, 4, IGNORE])
  outputs = _outputs(rng, 2, k, (8, 8), scale=1.0)
  outputs_bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), outputs)
  total32, terms32 = _jit_loss(k)(outputs, labels)
  total16, terms16 = _jit_loss(k)(outputs_bf16, labels)
  assert total16.dtype == jnp.float32
  for name in terms32:
    assert np.isfinite(float(terms16[name]))
    np.testing.assert_allclose(float(terms16[name]), float(terms32[name]), rtol=2e-2,
                               err_msg=name)
  # With bf16-representable values the float32 computation makes the two identical.
  rounded = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), outputs)
  np.testing.assert_allclose(float(total16), float(_jit_loss(k)(rounded, labels)[0]), rtol=1e-6)


def test_shape_errors_name_the_offending_array():
  rng = np.random.default_rng(8)
  outputs = _outputs(rng, 2, 5, (4, 4))
  labels = np.zeros((2, 16, 16), np.int32)
  with pytest.raises(ValueError, match='class_logits'):
    losses.atm_loss(outputs, labels, num_classes=6)
  bad = dict(outputs, aux=({**outputs['aux'][0], 'mask_logits': np.zeros((2, 4, 4, 3))},))
  with pytest.raises(ValueError, match=r"\['aux'\]\[0\].*mask_logits"):
    losses.atm_loss(bad, labels, num_classes=5)
