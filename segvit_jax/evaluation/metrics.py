"""Semantic segmentation metrics as mmseg 0.24 defines them (`mmseg/core/evaluation/metrics.py`).

Two steps, so that the expensive one can run on device inside `jit` and sum over hosts:

    conf = confusion_matrix(pred, label, num_classes)         # (K, K) int32, jit-able
    metrics = segmentation_metrics(np.asarray(conf))           # host numpy, float64

The confusion matrix has ground truth on the rows and predictions on the columns, so per class c:
intersect = conf[c, c], area_label = conf[c, :].sum(), area_pred = conf[:, c].sum() and
union = area_label + area_pred - intersect, which are exactly mmseg's four histograms.

mmseg's NaN semantics, kept here:
- IoU_c = intersect / union: NaN when the class is absent from both prediction and label (0 / 0);
  0 when it is only predicted (a false positive class counts against the mean).
- Acc_c = intersect / area_label: NaN when the class is absent from the label, even if predicted.
- mIoU and mAcc are `nanmean`s over classes; aAcc = sum(intersect) / sum(area_label).
mmseg reports these as percentages rounded to 2 decimals; we return unrounded fractions in [0, 1].
"""

from typing import Any, Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred: jnp.ndarray, label: jnp.ndarray, num_classes: int,
                     valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Counts of (label, prediction) pairs: (K, K) int32, rows = ground truth, cols = prediction.

  Args:
    pred: int predictions of any shape, values in [0, K).
    label: int labels of the same shape; 255 (and any value outside [0, K)) is ignored.
    num_classes: K, static.
    valid: optional bool array broadcastable to `label`'s shape; pixels where it is False are
      ignored (padding of a static bucket, padding examples of the last batch).

  Static shapes throughout (a masked bincount over K * K bins), so it runs under `jit` on
  sharded arrays; with global arrays the sum covers every host. int32 counts hold 2^31 - 1 pixels:
  callers accumulating a whole split move partial sums to the host before that (see
  `evaluate.evaluate`).
  """
  pred = jnp.asarray(pred)
  label = jnp.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f'confusion_matrix: pred shape {pred.shape} != label shape {label.shape}.')
  k = int(num_classes)
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  # Labels outside [0, K) other than 255 cannot occur after the dataset mapping; ignoring them
  # (instead of counting them in the prediction histogram as mmseg's histc would) keeps the
  # matrix square.
  keep = (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
  if valid is not None:
    keep = keep & jnp.broadcast_to(jnp.asarray(valid, bool), label.shape)
  index = jnp.where(keep, label * k + pred, 0)
  counts = jnp.bincount(index.reshape(-1), weights=keep.reshape(-1).astype(jnp.int32),
                        length=k * k)
  return counts.reshape(k, k)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator with NaN where the denominator is 0 (as torch's 0 / 0)."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    out = numerator / denominator
  return np.where(denominator == 0, np.nan, out)


def _nanmean(x: np.ndarray) -> float:
  """Mean over the non-NaN entries; NaN when there are none (without numpy's warning)."""
  x = np.asarray(x, np.float64)
  finite = ~np.isnan(x)
  return float(x[finite].mean()) if finite.any() else float('nan')


def segmentation_metrics(conf: Any, class_names: Optional[Sequence[str]] = None
                         ) -> Dict[str, Any]:
  """mmseg's `eval_metrics(..., metrics=['mIoU'])` from a (K, K) confusion matrix.

  Args:
    conf: (K, K) counts, rows = ground truth, cols = prediction (numpy or a fetched jax array).
    class_names: optional K names, carried into the result for `to_scalars` / `format_table`.

  Returns:
    {'miou': float, 'macc': float, 'aacc': float, 'per_class_iou': (K,) float64 with NaN for
     classes absent from prediction and label, 'per_class_acc': (K,) float64 with NaN for classes
     absent from the label, 'class_names': tuple of K names (given, or '0'..'K-1')}.
  """
  conf = np.asarray(conf)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f'segmentation_metrics: conf must be a square (K, K) matrix, got '
                     f'{conf.shape}.')
  k = conf.shape[0]
  if class_names is None:
    class_names = tuple(str(c) for c in range(k))
  elif len(class_names) != k:
    raise ValueError(f'segmentation_metrics: {len(class_names)} class_names for {k} classes.')
  conf = conf.astype(np.int64)
  intersect = np.diag(conf)
  area_label = conf.sum(axis=1)
  area_pred = conf.sum(axis=0)
  union = area_label + area_pred - intersect
  iou = _divide(intersect, union)
  acc = _divide(intersect, area_label)
  aacc = _divide(intersect.sum(), area_label.sum())
  return {
      'miou': _nanmean(iou),
      'macc': _nanmean(acc),
      'aacc': float(aacc),
      'per_class_iou': iou,
      'per_class_acc': acc,
      'class_names': tuple(class_names),
  }


def to_scalars(metrics: Dict[str, Any], prefix: str = '') -> Dict[str, float]:
  """Flat {name: float} for metric writers: miou, macc, aacc, iou/<class>, acc/<class>."""
  out = {f'{prefix}{key}': float(metrics[key]) for key in ('miou', 'macc', 'aacc')}
  for name, iou, acc in zip(metrics['class_names'], metrics['per_class_iou'],
                            metrics['per_class_acc']):
    out[f'{prefix}iou/{name}'] = float(iou)
    out[f'{prefix}acc/{name}'] = float(acc)
  return out


def format_table(metrics: Dict[str, Any]) -> str:
  """A per-class text table in percent (as mmseg logs it), then the summary line."""
  names = metrics['class_names']
  width = max([5] + [len(n) for n in names])
  lines = [f'{"Class":<{width}}  {"IoU":>6}  {"Acc":>6}']
  for name, iou, acc in zip(names, metrics['per_class_iou'], metrics['per_class_acc']):
    lines.append(f'{name:<{width}}  {100 * iou:6.2f}  {100 * acc:6.2f}')
  lines.append(f'aAcc {100 * metrics["aacc"]:.2f}  mIoU {100 * metrics["miou"]:.2f}  '
               f'mAcc {100 * metrics["macc"]:.2f}')
  return '\n'.join(lines)
