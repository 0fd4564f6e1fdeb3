"""The ATM loss of SegViT (official `losses/atm_loss.py`, `losses/criterion.py`): class CE +
sigmoid focal + dice, no matching.

Query c is assigned to class c (the ATM head has exactly one query per class), so the targets are
read straight from the label map and every shape is static under `jit`:

- `present[b, c]` is True when class c occurs in image b (255 = ignore is never a class).
- Class loss: weighted cross-entropy over all B*K queries; the target of query c is c when present
  and K ("no object") otherwise; weight 1 per class and `no_object_weight` for K. As PyTorch's
  weighted `cross_entropy`, the mean is sum(w_t * ce) / sum(w_t) over the global batch.
- Mask losses, for present (b, c) pairs only: the query's mask logits are bilinearly upsampled to
  the label size; the target is (label == c), where ignore pixels (255, also padding) are negatives,
  never excluded. Sigmoid focal loss (alpha 0.25, gamma 2) is averaged over pixels, dice is
  1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1); both are summed over masks and divided by
  num_masks, the number of present (b, c) pairs in the global batch (at least 1).

The official code builds one target list per image and loops; here each image's present classes
are gathered into a fixed number of slots (static shapes; a batch with more classes in an image
falls back to all K masks), computed with elementwise ops followed by reductions over (H, W),
which XLA fuses, and the empty slots are masked out of the sums. Everything is computed in
float32. At 640x640 with K = 150 one (B, H, W, K) float32 tensor is 246 MB per image: the mask
losses are recomputed in the backward pass so that only the low-resolution mask logits are kept
between the two passes.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from segvit_jax.models import resize


def class_cross_entropy(class_logits: jnp.ndarray, present: jnp.ndarray,
                        no_object_weight: float) -> jnp.ndarray:
  """Weighted-mean cross-entropy of the class predictions (PyTorch `cross_entropy(weight=...)`).

  Args:
    class_logits: (B, K, K + 1) float, query c's logits over K classes + "no object" (last).
    present: (B, K) bool, class c occurs in image b.
    no_object_weight: weight of the "no object" target (the official eos_coef, 0.1).

  Returns:
    Scalar float32: sum(w_t * ce) / sum(w_t) over all B * K queries.
  """
  num_classes = present.shape[-1]
  targets = jnp.where(present, jnp.arange(num_classes)[None, :], num_classes)
  log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weights = jnp.where(present, 1.0, no_object_weight)
  return jnp.sum(weights * nll) / jnp.sum(weights)


def sigmoid_focal_loss(logits: jnp.ndarray, targets: jnp.ndarray, *, alpha: float = 0.25,
                       gamma: float = 2.0, axes=(1, 2)) -> jnp.ndarray:
  """Sigmoid focal loss (RetinaNet form as in torchvision/detectron2), averaged over `axes`.

  loss = alpha_t * bce(x, t) * (1 - p_t) ** gamma with p = sigmoid(x),
  p_t = p t + (1 - p)(1 - t) and alpha_t = alpha t + (1 - alpha)(1 - t).

  Args:
    logits: float array, e.g. (B, H, W, K) mask logits.
    targets: float array of 0/1 with the shape of `logits`.
    alpha: weight of the positives.
    gamma: focusing exponent.
    axes: the pixel axes to average over.

  Returns:
    `logits` reduced over `axes`, e.g. (B, K): one loss per mask.
  """
  prob = jax.nn.sigmoid(logits)
  # Numerically stable binary cross-entropy with logits.
  bce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
  one_minus = 1.0 - p_t
  # An integer power keeps the gradient exact and cheap (gamma is 2 in every released config).
  modulator = one_minus ** int(gamma) if float(gamma).is_integer() else one_minus ** gamma
  loss = bce * modulator
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return jnp.mean(loss, axis=axes)


def dice_loss(logits: jnp.ndarray, targets: jnp.ndarray, *, axes=(1, 2)) -> jnp.ndarray:
  """Dice loss 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) with p = sigmoid(logits), per mask.

  Args:
    logits: float array, e.g. (B, H, W, K) mask logits.
    targets: float array of 0/1 with the shape of `logits`.
    axes: the pixel axes to sum over.

  Returns:
    `logits` reduced over `axes`, e.g. (B, K).
  """
  prob = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.sum(prob * targets, axis=axes) + 1.0
  denominator = jnp.sum(prob, axis=axes) + jnp.sum(targets, axis=axes) + 1.0
  return 1.0 - numerator / denominator


def class_targets(labels: jnp.ndarray, num_classes: int) -> jnp.ndarray:
  """(B, H, W) int labels -> (B, H, W, K) float32 one-hot masks; 255 (and any id >= K) is all 0."""
  return (labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)).astype(jnp.float32)


def _summed_mask_losses(logits, targets, valid, num_masks):
  """Focal and dice of (B, H, W, M) full-resolution logits vs targets, summed over the valid
  (B, M) masks and divided by num_masks."""
  focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, axes=(1, 2))
  dice = dice_loss(logits, targets, axes=(1, 2))
  return (jnp.sum(jnp.where(valid, focal, 0.0)) / num_masks,
          jnp.sum(jnp.where(valid, dice, 0.0)) / num_masks)


def mask_losses(mask_logits: jnp.ndarray, labels: jnp.ndarray, present: jnp.ndarray,
                num_masks: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Focal and dice losses of one output's masks, over the present (b, c) pairs.

  Args:
    mask_logits: (B, h, w, K) mask logits at any resolution; upsampled to the label size.
    labels: (B, H, W) int32 labels, 255 = ignore (negative in every class mask).
    present: (B, K) bool.
    num_masks: scalar float, number of present pairs in the global batch, >= 1.

  Returns:
    (focal, dice) scalars, each summed over present masks and divided by num_masks.
  """
  num_classes = mask_logits.shape[-1]
  logits = resize.resize_bilinear(mask_logits.astype(jnp.float32), labels.shape[1:3])
  return _summed_mask_losses(logits, class_targets(labels, num_classes), present, num_masks)


def _gathered_mask_losses(mask_logits, labels, present, num_masks, *, slots: int):
  """`mask_losses` on each image's present classes gathered into `slots` places (first the
  present classes in class order, then padding); exact when no image has more than `slots`."""
  classes = jnp.argsort(~present, axis=-1, stable=True)[:, :slots]  # (B, S): a stable sort
  logits = jnp.take_along_axis(mask_logits.astype(jnp.float32), classes[:, None, None, :],
                               axis=-1)
  logits = resize.resize_bilinear(logits, labels.shape[1:3])
  targets = (labels[..., None] == classes[:, None, None, :]).astype(jnp.float32)
  valid = jnp.take_along_axis(present, classes, axis=-1)
  return _summed_mask_losses(logits, targets, valid, num_masks)


def _by_presence(present, slots, gathered, every_class, *operands):
  """gathered(*operands) when no image has more than `slots` present classes (decided at run
  time), every_class(*operands) otherwise or when `slots` covers all K anyway."""
  if slots >= present.shape[-1]:
    return every_class(*operands)
  fits = jnp.max(jnp.sum(present, axis=-1)) <= slots
  return jax.lax.cond(fits, gathered, every_class, *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def present_mask_losses(mask_logits: jnp.ndarray, labels: jnp.ndarray, present: jnp.ndarray,
                        num_masks: jnp.ndarray, slots: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`mask_losses` computed on the present classes only, `slots` per image.

  Each image's present classes are gathered into `slots` places before the upsampling, so the
  full-resolution work is B * slots masks instead of B * K (an ADE20K image has about 10 of the
  150 classes). When some image has more than `slots` classes, the batch takes `mask_losses` over
  all K instead: the result is the same either way (up to float rounding).

  The backward pass recomputes the forward from the low-resolution logits (nothing at label
  resolution is kept between the passes), and the choice between the two ways is made inside
  the custom gradient: differentiating through `lax.cond` would materialise the residuals of both.
  """
  return _present_mask_losses_fwd(mask_logits, labels, present, num_masks, slots)[0]


def _present_mask_losses_fwd(mask_logits, labels, present, num_masks, slots):
  losses_ = _by_presence(present, slots, functools.partial(_gathered_mask_losses, slots=slots),
                         mask_losses, mask_logits, labels, present, num_masks)
  return losses_, (mask_logits, labels, present, num_masks)


def _present_mask_losses_bwd(slots, residuals, cotangents):
  mask_logits, labels, present, num_masks = residuals

  def gradient(fn):
    def of_logits(logits):
      return jax.vjp(lambda x: fn(x, labels, present, num_masks), logits)[1](cotangents)[0]
    return of_logits

  d_logits = _by_presence(
      present, slots, gradient(functools.partial(_gathered_mask_losses, slots=slots)),
      gradient(mask_losses), mask_logits)
  # Labels, presence and the mask count come from the labels: no gradient.
  return d_logits, None, None, jnp.zeros_like(num_masks)


present_mask_losses.defvjp(_present_mask_losses_fwd, _present_mask_losses_bwd)


def _check_output(output: Mapping[str, Any], name: str, batch: int, num_classes: int) -> None:
  cls_shape = tuple(output['class_logits'].shape)
  mask_shape = tuple(output['mask_logits'].shape)
  if cls_shape != (batch, num_classes, num_classes + 1):
    raise ValueError(f'{name}class_logits has shape {cls_shape}; expected (B, K, K + 1) = '
                     f'{(batch, num_classes, num_classes + 1)} with num_classes={num_classes}.')
  if len(mask_shape) != 4 or mask_shape[0] != batch or mask_shape[3] != num_classes:
    raise ValueError(f'{name}mask_logits has shape {mask_shape}; expected (B, h, w, K) with '
                     f'B={batch}, K={num_classes}.')


def atm_loss(outputs: Mapping[str, Any], labels: jnp.ndarray, *, num_classes: int,
             no_object_weight: float = 0.1, cls_weight: float = 1.0, mask_weight: float = 20.0,
             dice_weight: float = 1.0,
             mask_slots: int = 32) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The SegViT ATM loss of the final output and every auxiliary output, all weighted equally.

  Args:
    outputs: the model's train-mode dict: 'class_logits' (B, K, K + 1), 'mask_logits'
      (B, h, w, K) and 'aux', a sequence of dicts with the same two keys (may be empty).
    labels: (B, H, W) int labels of the whole global batch; 255 = ignore (also padding).
    num_classes: K.
    no_object_weight: class-loss weight of the "no object" target.
    cls_weight, mask_weight, dice_weight: weights of class CE, sigmoid focal and dice losses.
    mask_slots: present classes per image computed at full resolution (`present_mask_losses`);
      only speed depends on it.

  Returns:
    (total, terms). `terms` holds the WEIGHTED losses under mmseg's names, as mmseg logs them:
    'loss_ce', 'loss_mask' (focal), 'loss_dice' for the final output and 'loss_ce_i',
    'loss_mask_i', 'loss_dice_i' for aux output i. total == sum(terms.values()).
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  if labels.ndim != 3:
    raise ValueError(f'labels must be (B, H, W) int with 255 = ignore; got shape {labels.shape}.')
  batch = labels.shape[0]
  named = [('', outputs)] + [(f'_{i}', aux) for i, aux in enumerate(outputs.get('aux', ()))]
  for suffix, output in named:
    _check_output(output, 'outputs' + (f"['aux'][{suffix[1:]}]" if suffix else '') + ': ',
                  batch, num_classes)

  present = jnp.any(labels[..., None] == jnp.arange(num_classes), axis=(1, 2))  # (B, K)
  num_masks = jnp.maximum(jnp.sum(present).astype(jnp.float32), 1.0)

  terms = {}
  for suffix, output in named:
    ce = class_cross_entropy(output['class_logits'], present, no_object_weight)
    # The backward pass recomputes the full-resolution logits from the (B, h, w, K) ones instead
    # of keeping one such buffer alive per output (see present_mask_losses).
    focal, dice = present_mask_losses(output['mask_logits'], labels, present, num_masks,
                                      mask_slots)
    terms['loss_ce' + suffix] = cls_weight * ce
    terms['loss_mask' + suffix] = mask_weight * focal
    terms['loss_dice' + suffix] = dice_weight * dice
  total = sum(terms.values())
  return total, terms
